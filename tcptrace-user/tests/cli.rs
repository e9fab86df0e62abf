//! The binary's behaviour on bad input, which needs no root: clear message, non-zero
//! exit, never a panic.

use std::{net::TcpListener, process::Command};

fn tcptrace(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn bad_flags_exit_2_with_the_reason() {
    for (args, says) in [
        (&["daemon", "--listen", "nonsense"][..], "IP:PORT"),
        (&["daemon", "--ring-buffer-size", "3MiB"][..], "power of two"),
        (&["daemon", "--bogus"][..], "unexpected argument"),
        (&[][..], "Usage"),
    ] {
        let (code, _, err) = tcptrace(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn help_documents_the_defaults() {
    let (code, out, _) = tcptrace(&["daemon", "--help"]);
    assert_eq!(code, Some(0));
    for needle in ["0.0.0.0:9931", "--ring-buffer-size", "1MiB", "--max-tracked-sockets", "tcp_synack_retries"] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
}

#[test]
fn a_taken_listen_address_is_explained() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (code, _, err) = tcptrace(&["daemon", "--listen", &addr.to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")) && err.contains("--listen"), "{err}");
    assert!(err.contains("ss -ltnp"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
