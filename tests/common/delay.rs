//! A delay line: a TCP proxy on 127.0.0.1 that holds every byte it carries for a set time in
//! each direction before passing it on, in order — a slower link to one replica, for the
//! balancer to notice. Throughput is not limited; only latency is added.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
    time::Instant,
};

pub struct DelayLine {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    tasks: tokio::task::JoinHandle<()>,
}

impl DelayLine {
    /// A line to `target` adding `each_way` to each direction (so 2 × to a round trip).
    pub async fn start(target: SocketAddr, each_way: Duration) -> DelayLine {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                conns.spawn(async move {
                    let Ok(up) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(carry(dr, uw, each_way), carry(ur, dw, each_way));
                });
            }
        });
        DelayLine { addr, tasks }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        // Aborting the acceptor drops its JoinSet, which aborts every connection.
        self.tasks.abort();
    }
}

/// Copy `r` to `w`, each chunk written `delay` after it was read.
async fn carry(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
