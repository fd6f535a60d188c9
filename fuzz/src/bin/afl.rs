//! The coverage-guided driver: AFL++ through afl.rs, on stable Rust. Build with
//! `cargo afl build --release -p trellis-fuzz --features afl --bin trellis-fuzz-afl`, run with
//! `TRELLIS_FUZZ_TARGET=<target> cargo afl fuzz -i fuzz/corpus/<target> -o <out> <binary>`
//! (`bench/fuzz.sh` does both when `FUZZ_DRIVER=afl`).

fn main() {
    let name = std::env::var("TRELLIS_FUZZ_TARGET").unwrap_or_default();
    let Some(target) = trellis_fuzz::target(&name) else {
        eprintln!("set TRELLIS_FUZZ_TARGET to one of the targets (trellis-fuzz list)");
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        (target.run)(&data[..data.len().min(target.max_len)]);
    });
}
