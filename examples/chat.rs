//! A minimal terminal chat client: each line you type is sent as `{"text": line}` and the
//! frames of the reply are printed as they arrive.
//!
//! ```text
//! cargo run --example chat -- ws://127.0.0.1:1865/ws/alice
//! ```

use std::io::{BufRead, Write};
use tungstenite::Message;

fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:1865/ws/user".to_string());
    let (mut ws, _) = match tungstenite::connect(url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot connect to {url}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("connected to {url}; type a message, Ctrl-D to quit");
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let msg = serde_json::json!({ "text": line }).to_string();
        if let Err(e) = ws.send(Message::text(msg)) {
            eprintln!("send failed: {e}");
            break;
        }
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match v["type"].as_str() {
                        // Tokens carry their own spacing, as an LLM's do.
                        Some("chat_token") => print!("{}", v["content"].as_str().unwrap_or("")),
                        Some("chat") => {
                            println!("\nAI: {}", v["content"].as_str().unwrap_or(""));
                            break;
                        }
                        Some("error") => {
                            println!("\nerror {}: {}", v["name"], v["content"]);
                            break;
                        }
                        _ => println!("{t}"),
                    }
                    let _ = std::io::stdout().flush();
                }
                Ok(Message::Close(c)) => {
                    eprintln!("closed by server: {c:?}");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("read failed: {e}");
                    return;
                }
            }
        }
    }
    let _ = ws.close(None);
}
