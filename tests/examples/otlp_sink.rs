//! A stand-in for Jaeger's OTLP/gRPC port for benchmarks: accepts trace exports and keeps them
//! in memory. Prints its address, then serves until killed.
//! `cargo run --release -p trellis-tests --example otlp_sink`

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let c = trellis_tests::otlp::Collector::start().await;
    println!("{}", c.endpoint());
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}
