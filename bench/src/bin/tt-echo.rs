//! The tokio-tungstenite peer of straycat's benchmarks: a WebSocket echo server on any
//! path, with tokio-tungstenite's default `WebSocketConfig`, written the way its own
//! `echo-server` example is (`read.forward(write)`, which batches writes and flushes when
//! the reader would block).
//!
//! ```text
//! tt-echo --listen 127.0.0.1:19002 [--nodelay] [--multi-thread]
//! ```
//!
//! The runtime is tokio's current-thread one by default (the benchmarks pin each server to
//! one core, and straycat is one thread); `--multi-thread` uses `#[tokio::main]`'s default
//! multi-thread runtime instead. `--nodelay` sets TCP_NODELAY on accepted sockets (tokio's
//! default leaves Nagle's algorithm on). Only loopback addresses are accepted.

use futures_util::{StreamExt, TryStreamExt, future};
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio::net::{TcpListener, TcpStream};

async fn serve(listener: TcpListener, nodelay: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(echo(stream, nodelay));
    }
}

async fn echo(stream: TcpStream, nodelay: bool) {
    if nodelay {
        let _ = stream.set_nodelay(true);
    }
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (write, read) = ws.split();
    // Text and binary come back; tungstenite answers pings and closes by itself.
    let _ = read
        .try_filter(|m| future::ready(m.is_text() || m.is_binary()))
        .forward(write)
        .await;
}

fn main() -> ExitCode {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 19002));
    let mut nodelay = false;
    let mut multi = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodelay" => nodelay = true,
            "--multi-thread" => multi = true,
            "--listen" => match args.next().and_then(|v| v.parse().ok()) {
                Some(v) => listen = v,
                None => {
                    eprintln!("tt-echo: --listen needs an address");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("usage: tt-echo [--listen 127.0.0.1:PORT] [--nodelay] [--multi-thread]");
                return ExitCode::from(2);
            }
        }
    }
    if !listen.ip().is_loopback() {
        eprintln!("tt-echo: benchmark servers listen on loopback only");
        return ExitCode::from(2);
    }
    let runtime = if multi {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tt-echo: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match TcpListener::bind(listen).await {
            Ok(l) => {
                serve(l, nodelay).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tt-echo: bind {listen}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
