use super::*;

async fn echo_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn link_cut_all_closes_live_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let link = FaultyLink::start(echo_server().await).await.unwrap();
    let mut a = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    let mut b = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    for s in [&mut a, &mut b] {
        s.write_all(b"ping").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
    assert_eq!(link.live_connections(), 2);
    link.cut_all();
    for s in [&mut a, &mut b] {
        let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "connection must be closed, read {n:?}"
        );
    }
    // New connections still work after a cut.
    let mut c = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    c.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn link_pause_blackholes_without_closing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let link = FaultyLink::start(echo_server().await).await.unwrap();
    let mut a = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    a.write_all(b"ping").await.unwrap();
    a.read_exact(&mut buf).await.unwrap();
    link.pause();
    a.write_all(b"lost").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.read(&mut buf))
            .await
            .is_err(),
        "paused link forwarded data"
    );
    link.resume();
    tokio::time::timeout(T, a.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"lost");
}

#[tokio::test]
async fn gateway_behind_a_cut_link_sees_the_relay_drop() {
    let env = env().await;
    let link = FaultyLink::start(env.gw.local_addr()).await.unwrap();
    let (_sup, sandbox, _tx, _ctl) = bound(&env, "warm-link").await;
    let mut sup2 = {
        let ch = channel(link.endpoint(false), None).await.unwrap();
        let mut s = Sup {
            pod: _sup.pod.clone(),
            client: GatewayClient::new(ch),
            token: _sup.token.clone(),
            sandbox_id: _sup.sandbox_id.clone(),
            claim_uid: _sup.claim_uid.clone(),
        };
        let (_t, mut c) = s.connect(vec![]).await;
        assert!(matches!(next_control(&mut c).await, GwMsg::Accepted(_)));
        (s, _t, c)
    };
    link.cut_all();
    let e = control_status(&mut sup2.2).await;
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Internal),
        "{e}"
    );
    // The gateway notices the dead control stream.
    env.gw
        .shared_for_tests()
        .wait_for(
            T,
            || "disconnect".into(),
            |st| {
                st.sandboxes
                    .get(sandbox.id())
                    .filter(|s| s.control.is_none())
                    .map(|_| ())
            },
        )
        .await
        .unwrap();
}
