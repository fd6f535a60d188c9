//! WebSocket (HTTP/1.1 upgrade) end to end.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use trellis_tests::Mesh;

#[tokio::test]
async fn websocket_upgrade_and_echo_through_the_mesh() {
    let mesh = Mesh::start().await;
    let tcp = TcpStream::connect(mesh.client.outbound()).await.unwrap();
    let req = "ws://echo/ws".into_client_request().unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..10 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let back = ws.next().await.expect("open").expect("message");
        assert_eq!(back, Message::text(text));
    }
    let big = vec![7u8; 256 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();
}
