//! Property-based tests: arbitrary messages round-trip exactly, and arbitrary
//! bytes never make any decoder panic.

use dough_proto::{
    decode_guest, decode_host, encode, read_frame, Entropy, Exec, ExitStatus, FrameDecoder,
    FrameError, GuestMsg, Hello, HostMsg, Stream, Welcome, HEADER_LEN, MAX_FRAME,
};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    // Mostly short strings of any Unicode, sometimes empty.
    prop_oneof![Just(String::new()), ".{0,24}", "[a-zA-Z0-9/_.=-]{1,16}"]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn entropy() -> impl Strategy<Value = Entropy> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut all = [0u8; 64];
        all[..32].copy_from_slice(&a);
        all[32..].copy_from_slice(&b);
        Entropy::new(all)
    })
}

fn exec() -> impl Strategy<Value = Exec> {
    (
        any::<u64>(),
        vec(text(), 0..6),
        vec((text(), text()), 0..6),
        proptest::option::of(text()),
        proptest::option::of(bytes(256)),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(id, argv, env, cwd, stdin, timeout_ms)| Exec {
            id,
            argv,
            env,
            cwd,
            stdin,
            stdin_follows: false,
            timeout_ms,
        })
}

fn host_msg() -> impl Strategy<Value = HostMsg> {
    prop_oneof![
        Just(HostMsg::Attach),
        (any::<u64>(), bytes(64)).prop_map(|(id, data)| HostMsg::Input { id, data }),
        any::<u64>().prop_map(|id| HostMsg::InputEnd { id }),
        (any::<u32>(), any::<u64>(), entropy(), text()).prop_map(
            |(proto_version, host_time_ns, entropy, vm_id)| HostMsg::Welcome(Welcome {
                proto_version,
                host_time_ns,
                entropy,
                vm_id,
            })
        ),
        exec().prop_map(HostMsg::Exec),
        (any::<u64>(), any::<i32>()).prop_map(|(id, signal)| HostMsg::Signal { id, signal }),
        any::<u64>().prop_map(|seq| HostMsg::Ping { seq }),
    ]
}

fn stream() -> impl Strategy<Value = Stream> {
    prop_oneof![Just(Stream::Stdout), Just(Stream::Stderr)]
}

fn exit_status() -> impl Strategy<Value = ExitStatus> {
    prop_oneof![
        any::<i32>().prop_map(ExitStatus::Exited),
        any::<i32>().prop_map(ExitStatus::Signaled),
        Just(ExitStatus::TimedOut),
        text().prop_map(ExitStatus::SpawnFailed),
    ]
}

fn guest_msg() -> impl Strategy<Value = GuestMsg> {
    prop_oneof![
        (any::<u32>(), text(), text()).prop_map(|(proto_version, agent_version, boot_id)| {
            GuestMsg::Hello(Hello {
                proto_version,
                agent_version,
                boot_id,
            })
        }),
        (any::<u64>(), stream(), bytes(1024)).prop_map(|(id, stream, data)| GuestMsg::Output {
            id,
            stream,
            data
        }),
        (any::<u64>(), exit_status()).prop_map(|(id, status)| GuestMsg::Exit { id, status }),
        (any::<u64>(), text()).prop_map(|(id, message)| GuestMsg::Error { id, message }),
        any::<u64>().prop_map(|seq| GuestMsg::Pong { seq }),
    ]
}

/// Split `data` at the given (unsorted, possibly out-of-range) points.
fn chunk<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|&c| c % (data.len() + 1)).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

/// What a correct decoder must produce for a whole stream: the payloads up
/// to the first oversized header, and whether that header was met.
fn reference_frames(data: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let len = u32::from_be_bytes(rest[..HEADER_LEN].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            return (out, true);
        }
        if rest.len() - HEADER_LEN < len {
            break;
        }
        out.push(rest[HEADER_LEN..HEADER_LEN + len].to_vec());
        rest = &rest[HEADER_LEN + len..];
    }
    (out, false)
}

/// Feed chunks to a decoder, draining after each push, until the first error.
fn run_decoder(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool, FrameDecoder) {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for c in chunks {
        dec.push(c);
        loop {
            match dec.next_frame() {
                Ok(Some(p)) => {
                    assert!(p.len() <= MAX_FRAME);
                    out.push(p);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge(n)) => {
                    assert!(n > MAX_FRAME);
                    assert_eq!(dec.pending(), 0, "decoder resets after TooLarge");
                    return (out, true, dec);
                }
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
    }
    (out, false, dec)
}

/// Bytes that look a bit like frames more often than uniform noise does:
/// small length prefixes followed by payload-ish bytes.
fn frameish() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![
            // A plausible frame with an honest length.
            bytes(40).prop_map(|p| {
                let mut f = (p.len() as u32).to_be_bytes().to_vec();
                f.extend(p);
                f
            }),
            // Raw noise.
            bytes(16),
            // A header with an arbitrary (often huge) length.
            any::<u32>().prop_map(|n| n.to_be_bytes().to_vec()),
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    // Failures print a minimal input to paste into a unit test; there is no
    // lib.rs beside this file for proptest's regression files to sit next to.
    // This suite is the decoder fuzzer: `PROPTEST_CASES=200000 cargo test
    // -p dough-proto --release --test prop` runs it for longer.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    // -----------------------------------------------------------------------
    // Round trips.
    // -----------------------------------------------------------------------

    #[test]
    fn host_msg_round_trips(msg in host_msg()) {
        let frame = encode(&msg).unwrap();
        let len = u32::from_be_bytes(frame[..HEADER_LEN].try_into().unwrap()) as usize;
        prop_assert_eq!(len, frame.len() - HEADER_LEN);
        let mut r = &frame[..];
        let p = read_frame(&mut r).unwrap().unwrap();
        prop_assert_eq!(decode_host(&p).unwrap(), msg.clone());
        prop_assert!(read_frame(&mut r).unwrap().is_none());
        // Host messages are never mistaken for anything else by the host's
        // own decoder in a way that panics.
        let _ = decode_guest(&p);
    }

    #[test]
    fn guest_msg_round_trips(msg in guest_msg()) {
        let frame = encode(&msg).unwrap();
        let mut r = &frame[..];
        let p = read_frame(&mut r).unwrap().unwrap();
        prop_assert_eq!(decode_guest(&p).unwrap(), msg);
        prop_assert!(read_frame(&mut r).unwrap().is_none());
        let _ = decode_host(&p);
    }

    #[test]
    fn message_streams_round_trip_under_any_chunking(
        host in vec(host_msg(), 0..8),
        guest in vec(guest_msg(), 0..8),
        cuts in vec(any::<usize>(), 0..24),
    ) {
        let mut hs = Vec::new();
        for m in &host {
            hs.extend(encode(m).unwrap());
        }
        let (payloads, too_large, dec) = run_decoder(&chunk(&hs, &cuts));
        prop_assert!(!too_large);
        prop_assert_eq!(dec.pending(), 0);
        let got: Vec<HostMsg> = payloads.iter().map(|p| decode_host(p).unwrap()).collect();
        prop_assert_eq!(&got, &host);
        // And the same stream through read_frame.
        let mut r = &hs[..];
        let mut got = Vec::new();
        while let Some(p) = read_frame(&mut r).unwrap() {
            got.push(decode_host(&p).unwrap());
        }
        prop_assert_eq!(got, host);

        let mut gs = Vec::new();
        for m in &guest {
            gs.extend(encode(m).unwrap());
        }
        let (payloads, too_large, dec) = run_decoder(&chunk(&gs, &cuts));
        prop_assert!(!too_large);
        prop_assert_eq!(dec.pending(), 0);
        let got: Vec<GuestMsg> = payloads.iter().map(|p| decode_guest(p).unwrap()).collect();
        prop_assert_eq!(got, guest);
    }

    #[test]
    fn truncated_message_stream_waits(msgs in vec(guest_msg(), 1..5), cut_back in 1usize..64) {
        let mut s = Vec::new();
        for m in &msgs {
            s.extend(encode(m).unwrap());
        }
        let last_len = encode(msgs.last().unwrap()).unwrap().len();
        // Cut inside the last frame (at least one byte of it kept back).
        let cut = s.len() - cut_back.min(last_len - 1).max(1);
        let (payloads, too_large, dec) = run_decoder(&[&s[..cut]]);
        prop_assert!(!too_large);
        prop_assert_eq!(payloads.len(), msgs.len() - 1);
        prop_assert_eq!(dec.pending(), cut - (s.len() - last_len));
        let mut r = &s[..cut];
        for _ in 1..msgs.len() {
            prop_assert!(read_frame(&mut r).unwrap().is_some());
        }
        let is_truncated = matches!(read_frame(&mut r), Err(FrameError::Truncated { .. }));
        prop_assert!(is_truncated);
    }

    // -----------------------------------------------------------------------
    // Hostile input.
    // -----------------------------------------------------------------------

    #[test]
    fn arbitrary_payloads_never_panic(p in bytes(512)) {
        // If something decodes, it must re-encode to something that decodes
        // to the same message (the bytes may differ: trailing bytes are
        // ignored and varints need not be minimal).
        if let Ok(m) = decode_host(&p) {
            let again = encode(&m).unwrap();
            prop_assert_eq!(decode_host(&again[HEADER_LEN..]).unwrap(), m);
        }
        if let Ok(m) = decode_guest(&p) {
            let again = encode(&m).unwrap();
            prop_assert_eq!(decode_guest(&again[HEADER_LEN..]).unwrap(), m);
        }
    }

    #[test]
    fn mutated_messages_never_panic(
        msg in guest_msg(),
        host in host_msg(),
        edits in vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        for mut p in [
            encode(&msg).unwrap().split_off(HEADER_LEN),
            encode(&host).unwrap().split_off(HEADER_LEN),
        ] {
            for &(i, v) in &edits {
                let i = i % p.len();
                p[i] = v;
            }
            let _ = decode_guest(&p);
            let _ = decode_host(&p);
        }
    }

    #[test]
    fn decoder_matches_reference_under_any_chunking(
        data in prop_oneof![bytes(256), frameish()],
        cuts in vec(any::<usize>(), 0..32),
    ) {
        let (want, want_too_large) = reference_frames(&data);
        let (got, got_too_large, dec) = run_decoder(&chunk(&data, &cuts));
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(got_too_large, want_too_large);
        if !got_too_large {
            let consumed: usize = got.iter().map(|p| HEADER_LEN + p.len()).sum();
            prop_assert_eq!(dec.pending(), data.len() - consumed);
        }
        for p in &got {
            let _ = decode_host(p);
            let _ = decode_guest(p);
        }
    }

    #[test]
    fn read_frame_matches_reference(data in prop_oneof![bytes(256), frameish()]) {
        let (want, want_too_large) = reference_frames(&data);
        let mut r = &data[..];
        let mut got = Vec::new();
        let end = loop {
            match read_frame(&mut r) {
                Ok(Some(p)) => got.push(p),
                Ok(None) => break "eof",
                Err(FrameError::TooLarge(n)) => {
                    prop_assert!(n > MAX_FRAME);
                    break "too large";
                }
                Err(FrameError::Truncated { got, want }) => {
                    prop_assert!(got < want);
                    break "truncated";
                }
                Err(e) => panic!("unexpected error {e:?}"),
            }
        };
        prop_assert_eq!(&got, &want);
        let consumed: usize = got.iter().map(|p| HEADER_LEN + p.len()).sum();
        match end {
            "too large" => prop_assert!(want_too_large),
            "eof" => prop_assert_eq!(consumed, data.len()),
            _ => prop_assert!(!want_too_large && consumed < data.len()),
        }
        // Nothing beyond the header of an oversized frame was read.
        if want_too_large {
            prop_assert_eq!(r.len(), data.len() - consumed - HEADER_LEN);
        }
    }
}
