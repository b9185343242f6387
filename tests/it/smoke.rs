//! The basic round trip through every layer.

use crate::harness::Server;

#[tokio::test]
async fn put_then_get() {
    let server = Server::start();
    let mut c = server.client().await;
    let put = c.put("hello", "world", None).await.unwrap();
    assert_eq!(put.header().unwrap().revision(), 2);
    let got = c.get("hello", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"world");
}
