//! Example-based tests of the message codec and the framing layer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Read};

use dough_proto::{
    decode_guest, decode_host, encode, read_frame, write_frame, Entropy, Exec, ExitStatus,
    FrameDecoder, FrameError, GuestMsg, Hello, HostMsg, Stream, Welcome, HEADER_LEN, MAX_FRAME,
    OUTPUT_CHUNK, PROTO_VERSION,
};

// ---------------------------------------------------------------------------
// Allocation tracking: records the largest single allocation made by the
// current thread while tracking is switched on, so tests running in parallel
// on other threads do not disturb the measurement.
// ---------------------------------------------------------------------------

struct TrackingAlloc;

thread_local! {
    /// `Some(largest request so far)` while tracking on this thread.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    // `try_with`: the slot may already be gone while a thread shuts down.
    let _ = LARGEST.try_with(|l| {
        if let Some(max) = l.get() {
            l.set(Some(max.max(size)));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the bookkeeping in `note` touches only a const-initialised
// thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: TrackingAlloc = TrackingAlloc;

#[test]
fn allocation_tracker_works() {
    let (v, largest) = largest_alloc(|| vec![0u8; 100_000]);
    assert_eq!(v.len(), 100_000);
    assert!(largest >= 100_000, "{largest}");
    let ((), largest) = largest_alloc(|| ());
    assert_eq!(largest, 0);
}

/// Run `f` and return its result with the largest single allocation it made.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(Some(0)));
    let out = f();
    let max = LARGEST.with(|l| l.replace(None)).unwrap();
    (out, max)
}

// ---------------------------------------------------------------------------
// Sample messages: every variant, with edge-case field values.
// ---------------------------------------------------------------------------

fn entropy() -> Entropy {
    let mut b = [0u8; 64];
    for (i, x) in b.iter_mut().enumerate() {
        *x = i as u8 ^ 0x5a;
    }
    Entropy::new(b)
}

fn host_msgs() -> Vec<HostMsg> {
    vec![
        HostMsg::Attach,
        HostMsg::Welcome(Welcome {
            proto_version: PROTO_VERSION,
            host_time_ns: 1_700_000_000_123_456_789,
            entropy: entropy(),
            vm_id: "vm-0001".into(),
        }),
        HostMsg::Welcome(Welcome {
            proto_version: u32::MAX,
            host_time_ns: u64::MAX,
            entropy: Entropy::new([0xff; 64]),
            vm_id: String::new(),
        }),
        HostMsg::Exec(Exec {
            id: 1,
            argv: vec!["/bin/sh".into(), "-c".into(), "echo héllo ✓".into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("EMPTY".into(), String::new()),
            ],
            cwd: Some("/work".into()),
            stdin: Some(b"line one\n\0binary\xff".to_vec()),
            stdin_follows: false,
            timeout_ms: Some(30_000),
        }),
        HostMsg::Exec(Exec {
            id: u64::MAX,
            argv: vec![],
            env: vec![],
            cwd: None,
            stdin: None,
            stdin_follows: false,
            timeout_ms: None,
        }),
        HostMsg::Exec(Exec {
            id: 0,
            argv: vec![String::new()],
            env: vec![],
            cwd: Some(String::new()),
            stdin: Some(vec![]),
            stdin_follows: false,
            timeout_ms: Some(0),
        }),
        HostMsg::Exec(Exec {
            id: 3,
            argv: vec!["tar".into(), "-x".into()],
            env: vec![],
            cwd: None,
            stdin: None,
            stdin_follows: true,
            timeout_ms: None,
        }),
        HostMsg::Input {
            id: 3,
            data: vec![0, 1, 2, 255],
        },
        HostMsg::Input {
            id: 3,
            data: vec![],
        },
        HostMsg::InputEnd { id: 3 },
        HostMsg::Signal { id: 42, signal: 15 },
        HostMsg::Signal {
            id: 0,
            signal: i32::MIN,
        },
        HostMsg::Signal {
            id: u64::MAX,
            signal: i32::MAX,
        },
        HostMsg::Ping { seq: 0 },
        HostMsg::Ping { seq: u64::MAX },
    ]
}

fn guest_msgs() -> Vec<GuestMsg> {
    vec![
        GuestMsg::Hello(Hello {
            proto_version: PROTO_VERSION,
            agent_version: "0.1.0".into(),
            boot_id: "6f1c2d8e-1b7a-4e0e-9a51-0d2f0c3b9a77".into(),
        }),
        GuestMsg::Hello(Hello {
            proto_version: 0,
            agent_version: String::new(),
            boot_id: String::new(),
        }),
        GuestMsg::Output {
            id: 1,
            stream: Stream::Stdout,
            data: b"hello\n".to_vec(),
        },
        GuestMsg::Output {
            id: 2,
            stream: Stream::Stderr,
            data: vec![],
        },
        GuestMsg::Output {
            id: u64::MAX,
            stream: Stream::Stdout,
            data: vec![0xab; OUTPUT_CHUNK],
        },
        GuestMsg::Exit {
            id: 1,
            status: ExitStatus::Exited(0),
        },
        GuestMsg::Exit {
            id: 2,
            status: ExitStatus::Exited(-1),
        },
        GuestMsg::Exit {
            id: 3,
            status: ExitStatus::Signaled(9),
        },
        GuestMsg::Exit {
            id: 4,
            status: ExitStatus::TimedOut,
        },
        GuestMsg::Exit {
            id: 5,
            status: ExitStatus::SpawnFailed("No such file or directory".into()),
        },
        GuestMsg::Error {
            id: 6,
            message: "bad cwd: /nope".into(),
        },
        GuestMsg::Error {
            id: 7,
            message: String::new(),
        },
        GuestMsg::Pong { seq: 0 },
        GuestMsg::Pong { seq: u64::MAX },
    ]
}

/// Every variant of both enums must appear in the samples above; this match
/// stops compiling when a variant is added, as a reminder to extend them.
#[test]
fn samples_cover_every_variant() {
    let mut host = [false; 7];
    for m in host_msgs() {
        host[match m {
            HostMsg::Attach => 0,
            HostMsg::Welcome(_) => 1,
            HostMsg::Exec(_) => 2,
            HostMsg::Signal { .. } => 3,
            HostMsg::Ping { .. } => 4,
            HostMsg::Input { .. } => 5,
            HostMsg::InputEnd { .. } => 6,
        }] = true;
    }
    assert!(host.iter().all(|&b| b), "{host:?}");

    let mut guest = [false; 5];
    let mut status = [false; 4];
    for m in guest_msgs() {
        guest[match m {
            GuestMsg::Hello(_) => 0,
            GuestMsg::Output { .. } => 1,
            GuestMsg::Exit { status: s, .. } => {
                status[match s {
                    ExitStatus::Exited(_) => 0,
                    ExitStatus::Signaled(_) => 1,
                    ExitStatus::TimedOut => 2,
                    ExitStatus::SpawnFailed(_) => 3,
                }] = true;
                2
            }
            GuestMsg::Error { .. } => 3,
            GuestMsg::Pong { .. } => 4,
        }] = true;
    }
    assert!(guest.iter().all(|&b| b), "{guest:?}");
    assert!(status.iter().all(|&b| b), "{status:?}");
}

// ---------------------------------------------------------------------------
// Round trips.
// ---------------------------------------------------------------------------

fn frame_len_ok(frame: &[u8]) {
    assert!(frame.len() >= HEADER_LEN);
    let len = u32::from_be_bytes(frame[..HEADER_LEN].try_into().unwrap()) as usize;
    assert_eq!(
        len,
        frame.len() - HEADER_LEN,
        "length prefix must match payload"
    );
    assert!(len <= MAX_FRAME);
}

#[test]
fn host_round_trip_read_frame() {
    for msg in host_msgs() {
        let frame = encode(&msg).unwrap();
        frame_len_ok(&frame);
        let mut r = &frame[..];
        let payload = read_frame(&mut r).unwrap().expect("one frame");
        assert_eq!(decode_host(&payload).unwrap(), msg);
        assert!(
            read_frame(&mut r).unwrap().is_none(),
            "clean EOF after the frame"
        );
    }
}

#[test]
fn guest_round_trip_read_frame() {
    for msg in guest_msgs() {
        let frame = encode(&msg).unwrap();
        frame_len_ok(&frame);
        let mut r = &frame[..];
        let payload = read_frame(&mut r).unwrap().expect("one frame");
        assert_eq!(decode_guest(&payload).unwrap(), msg);
        assert!(
            read_frame(&mut r).unwrap().is_none(),
            "clean EOF after the frame"
        );
    }
}

#[test]
fn write_frame_matches_encode() {
    for msg in host_msgs() {
        let mut out = Vec::new();
        write_frame(&mut out, &msg).unwrap();
        assert_eq!(out, encode(&msg).unwrap());
    }
    for msg in guest_msgs() {
        let mut out = Vec::new();
        write_frame(&mut out, &msg).unwrap();
        assert_eq!(out, encode(&msg).unwrap());
    }
}

/// Feed `bytes` one at a time; return every payload, checking that nothing is
/// produced before the last byte of each frame has arrived.
fn decode_bytewise(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for &b in bytes {
        dec.push(&[b]);
        while let Some(p) = dec.next_frame().unwrap() {
            out.push(p);
        }
    }
    assert_eq!(dec.pending(), 0);
    assert!(dec.next_frame().unwrap().is_none());
    out
}

#[test]
fn host_round_trip_decoder_bytewise() {
    for msg in host_msgs() {
        let frame = encode(&msg).unwrap();
        let payloads = decode_bytewise(&frame);
        assert_eq!(payloads.len(), 1);
        assert_eq!(decode_host(&payloads[0]).unwrap(), msg);
    }
}

#[test]
fn guest_round_trip_decoder_bytewise() {
    for msg in guest_msgs() {
        let frame = encode(&msg).unwrap();
        let payloads = decode_bytewise(&frame);
        assert_eq!(payloads.len(), 1);
        assert_eq!(decode_guest(&payloads[0]).unwrap(), msg);
    }
}

#[test]
fn decoder_yields_frame_exactly_when_complete() {
    let msg = HostMsg::Exec(Exec {
        id: 9,
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        stdin: None,
        stdin_follows: false,
        timeout_ms: None,
    });
    let frame = encode(&msg).unwrap();
    let mut dec = FrameDecoder::new();
    for (i, &b) in frame.iter().enumerate() {
        dec.push(&[b]);
        let got = dec.next_frame().unwrap();
        if i + 1 < frame.len() {
            assert!(got.is_none(), "frame produced early at byte {i}");
            assert_eq!(dec.pending(), i + 1);
        } else {
            assert_eq!(decode_host(&got.unwrap()).unwrap(), msg);
            assert_eq!(dec.pending(), 0);
        }
    }
}

#[test]
fn several_frames_back_to_back() {
    let msgs = guest_msgs();
    let mut stream = Vec::new();
    for m in &msgs {
        write_frame(&mut stream, m).unwrap();
    }

    // read_frame, one after the other.
    let mut r = &stream[..];
    for m in &msgs {
        let p = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(&decode_guest(&p).unwrap(), m);
    }
    assert!(read_frame(&mut r).unwrap().is_none());

    // FrameDecoder, whole buffer in one push.
    let mut dec = FrameDecoder::new();
    dec.push(&stream);
    for m in &msgs {
        let p = dec.next_frame().unwrap().unwrap();
        assert_eq!(&decode_guest(&p).unwrap(), m);
    }
    assert!(dec.next_frame().unwrap().is_none());
    assert_eq!(dec.pending(), 0);

    // FrameDecoder, byte by byte.
    let payloads = decode_bytewise(&stream);
    let got: Vec<GuestMsg> = payloads.iter().map(|p| decode_guest(p).unwrap()).collect();
    assert_eq!(got, msgs);

    // FrameDecoder, odd chunk sizes that straddle frame boundaries.
    for chunk in [2, 3, 5, 7, 13, 1000] {
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for c in stream.chunks(chunk) {
            dec.push(c);
            while let Some(p) = dec.next_frame().unwrap() {
                got.push(decode_guest(&p).unwrap());
            }
        }
        assert_eq!(got, msgs, "chunk size {chunk}");
        assert_eq!(dec.pending(), 0);
    }
}

#[test]
fn decoder_keeps_partial_tail_across_pushes() {
    let a = encode(&HostMsg::Ping { seq: 1 }).unwrap();
    let b = encode(&HostMsg::Signal { id: 2, signal: 9 }).unwrap();
    let mut both = a.clone();
    both.extend_from_slice(&b[..3]);

    let mut dec = FrameDecoder::new();
    dec.push(&both);
    assert_eq!(
        decode_host(&dec.next_frame().unwrap().unwrap()).unwrap(),
        HostMsg::Ping { seq: 1 }
    );
    assert!(dec.next_frame().unwrap().is_none());
    assert_eq!(dec.pending(), 3);
    dec.push(&b[3..]);
    assert_eq!(
        decode_host(&dec.next_frame().unwrap().unwrap()).unwrap(),
        HostMsg::Signal { id: 2, signal: 9 }
    );
    assert_eq!(dec.pending(), 0);
}

#[test]
fn zero_length_frame() {
    let frame = [0u8, 0, 0, 0];
    let mut r = &frame[..];
    assert_eq!(read_frame(&mut r).unwrap(), Some(vec![]));
    let mut dec = FrameDecoder::new();
    dec.push(&frame);
    assert_eq!(dec.next_frame().unwrap(), Some(vec![]));
    // An empty payload is not a message.
    assert!(matches!(decode_host(&[]), Err(FrameError::Decode(_))));
    assert!(matches!(decode_guest(&[]), Err(FrameError::Decode(_))));
}

// ---------------------------------------------------------------------------
// Wire format: pin a few encodings so an accidental reordering of variants or
// fields (which would break host/agent compatibility) fails a test.
// ---------------------------------------------------------------------------

#[test]
fn golden_encodings() {
    assert_eq!(encode(&HostMsg::Attach).unwrap(), [0, 0, 0, 1, 0]);
    assert_eq!(
        encode(&HostMsg::Ping { seq: 1 }).unwrap(),
        [0, 0, 0, 2, 4, 1]
    );
    assert_eq!(
        encode(&HostMsg::Signal { id: 1, signal: -1 }).unwrap(),
        [0, 0, 0, 3, 3, 1, 1]
    );
    assert_eq!(
        encode(&GuestMsg::Pong { seq: 300 }).unwrap(),
        [0, 0, 0, 3, 4, 0xac, 0x02]
    );
    assert_eq!(
        encode(&GuestMsg::Exit {
            id: 7,
            status: ExitStatus::Signaled(9)
        })
        .unwrap(),
        [0, 0, 0, 4, 2, 7, 1, 18]
    );
    assert_eq!(
        encode(&GuestMsg::Hello(Hello {
            proto_version: 1,
            agent_version: "a".into(),
            boot_id: "b".into(),
        }))
        .unwrap(),
        [0, 0, 0, 6, 0, 1, 1, b'a', 1, b'b']
    );
}

#[test]
fn trailing_bytes_after_message_are_ignored() {
    // Documented behaviour: lets a future Hello with extra fields still be
    // read far enough to compare proto_version.
    let mut p = encode(&GuestMsg::Hello(Hello {
        proto_version: 2,
        agent_version: "x".into(),
        boot_id: "y".into(),
    }))
    .unwrap()
    .split_off(HEADER_LEN);
    p.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    match decode_guest(&p).unwrap() {
        GuestMsg::Hello(h) => assert_eq!(h.proto_version, 2),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Truncation.
// ---------------------------------------------------------------------------

#[test]
fn read_frame_truncated_header() {
    let frame = encode(&HostMsg::Ping { seq: 7 }).unwrap();
    for cut in 1..HEADER_LEN {
        let mut r = &frame[..cut];
        match read_frame(&mut r) {
            Err(FrameError::Truncated { got, want }) => {
                assert_eq!((got, want), (cut, HEADER_LEN));
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn read_frame_truncated_payload() {
    let frame = encode(&GuestMsg::Output {
        id: 3,
        stream: Stream::Stderr,
        data: b"0123456789".to_vec(),
    })
    .unwrap();
    let len = frame.len() - HEADER_LEN;
    for cut in HEADER_LEN..frame.len() {
        let mut r = &frame[..cut];
        match read_frame(&mut r) {
            Err(FrameError::Truncated { got, want }) => {
                assert_eq!((got, want), (cut - HEADER_LEN, len));
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn read_frame_truncated_second_frame() {
    let mut stream = encode(&HostMsg::Ping { seq: 1 }).unwrap();
    let second = encode(&HostMsg::Ping { seq: 2 }).unwrap();
    stream.extend_from_slice(&second[..second.len() - 1]);
    let mut r = &stream[..];
    assert!(read_frame(&mut r).unwrap().is_some());
    assert!(matches!(
        read_frame(&mut r),
        Err(FrameError::Truncated { .. })
    ));
}

#[test]
fn decoder_waits_on_truncated_input() {
    let frame = encode(&GuestMsg::Error {
        id: 1,
        message: "boom".into(),
    })
    .unwrap();
    for cut in 0..frame.len() {
        let mut dec = FrameDecoder::new();
        dec.push(&frame[..cut]);
        assert!(dec.next_frame().unwrap().is_none(), "cut {cut}");
        assert!(
            dec.next_frame().unwrap().is_none(),
            "asking twice changes nothing"
        );
        assert_eq!(dec.pending(), cut);
        // The rest arrives later: the frame completes.
        dec.push(&frame[cut..]);
        let p = dec.next_frame().unwrap().unwrap();
        assert_eq!(
            decode_guest(&p).unwrap(),
            GuestMsg::Error {
                id: 1,
                message: "boom".into()
            }
        );
    }
}

#[test]
fn decoder_reset_drops_partial_frame() {
    let frame = encode(&HostMsg::Ping { seq: 5 }).unwrap();
    let mut dec = FrameDecoder::new();
    dec.push(&frame[..frame.len() - 1]);
    assert!(dec.pending() > 0);
    dec.reset();
    assert_eq!(dec.pending(), 0);
    assert!(dec.next_frame().unwrap().is_none());
    // After reset a fresh stream decodes normally.
    dec.push(&frame);
    assert_eq!(
        decode_host(&dec.next_frame().unwrap().unwrap()).unwrap(),
        HostMsg::Ping { seq: 5 }
    );
}

// ---------------------------------------------------------------------------
// Oversized frames.
// ---------------------------------------------------------------------------

/// Supplies exactly the given header, then panics if read again: proves that
/// `read_frame` decides before asking for any payload.
struct HeaderOnly {
    hdr: [u8; HEADER_LEN],
    pos: usize,
}

impl Read for HeaderOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(self.pos < HEADER_LEN, "read_frame asked for payload bytes");
        let n = buf.len().min(HEADER_LEN - self.pos);
        buf[..n].copy_from_slice(&self.hdr[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn read_frame_rejects_oversize_without_allocating() {
    for len in [
        u32::MAX,
        MAX_FRAME as u32 + 1,
        0x8000_0000,
        64 * 1024 * 1024,
    ] {
        let mut r = HeaderOnly {
            hdr: len.to_be_bytes(),
            pos: 0,
        };
        let (res, largest) = largest_alloc(|| read_frame(&mut r));
        match res {
            Err(FrameError::TooLarge(n)) => assert_eq!(n, len as usize),
            other => panic!("len {len}: {other:?}"),
        }
        assert_eq!(r.pos, HEADER_LEN);
        assert!(largest < 1024, "len {len}: allocated {largest} bytes");
    }
}

#[test]
fn read_frame_accepts_exactly_max_frame() {
    let mut stream = (MAX_FRAME as u32).to_be_bytes().to_vec();
    stream.resize(HEADER_LEN + MAX_FRAME, 0x11);
    let mut r = &stream[..];
    let p = read_frame(&mut r).unwrap().unwrap();
    assert_eq!(p.len(), MAX_FRAME);

    let mut dec = FrameDecoder::new();
    dec.push(&stream);
    assert_eq!(dec.next_frame().unwrap().unwrap().len(), MAX_FRAME);
}

#[test]
fn decoder_rejects_oversize_on_header_alone() {
    for len in [u32::MAX, MAX_FRAME as u32 + 1] {
        let mut dec = FrameDecoder::new();
        // Header split over two pushes: nothing to say until all 4 bytes are in.
        let hdr = len.to_be_bytes();
        dec.push(&hdr[..2]);
        assert!(dec.next_frame().unwrap().is_none());
        dec.push(&hdr[2..]);
        let (res, largest) = largest_alloc(|| dec.next_frame());
        match res {
            Err(FrameError::TooLarge(n)) => assert_eq!(n, len as usize),
            other => panic!("len {len}: {other:?}"),
        }
        assert!(largest < 1024, "allocated {largest} bytes");
        // The decoder was reset and is usable again.
        assert_eq!(dec.pending(), 0);
        dec.push(&encode(&HostMsg::Ping { seq: 3 }).unwrap());
        assert_eq!(
            decode_host(&dec.next_frame().unwrap().unwrap()).unwrap(),
            HostMsg::Ping { seq: 3 }
        );
    }
}

#[test]
fn decoder_oversize_after_good_frame() {
    let mut stream = encode(&HostMsg::Ping { seq: 1 }).unwrap();
    stream.extend_from_slice(&u32::MAX.to_be_bytes());
    stream.extend_from_slice(b"junk that follows");
    let mut dec = FrameDecoder::new();
    dec.push(&stream);
    assert_eq!(
        decode_host(&dec.next_frame().unwrap().unwrap()).unwrap(),
        HostMsg::Ping { seq: 1 }
    );
    assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge(n)) if n == u32::MAX as usize));
    assert_eq!(dec.pending(), 0);
}

#[test]
fn encode_rejects_oversize_message() {
    // Find the largest Output that still fits, by measuring the overhead.
    let out = |n: usize| GuestMsg::Output {
        id: 1,
        stream: Stream::Stdout,
        data: vec![0; n],
    };
    let probe = MAX_FRAME - 16;
    let overhead = encode(&out(probe)).unwrap().len() - HEADER_LEN - probe;
    let fits = MAX_FRAME - overhead;

    let frame = encode(&out(fits)).unwrap();
    assert_eq!(frame.len(), HEADER_LEN + MAX_FRAME);
    let mut r = &frame[..];
    assert_eq!(
        decode_guest(&read_frame(&mut r).unwrap().unwrap()).unwrap(),
        out(fits)
    );

    match encode(&out(fits + 1)) {
        Err(FrameError::TooLarge(n)) => assert_eq!(n, MAX_FRAME + 1),
        other => panic!("{:?}", other.map(|v| v.len())),
    }
    let mut sink = Vec::new();
    assert!(matches!(
        write_frame(&mut sink, &out(fits + 1)),
        Err(FrameError::TooLarge(_))
    ));
    assert!(sink.is_empty(), "nothing written for a rejected message");
}

#[test]
fn output_chunk_fits_in_a_frame() {
    let msg = GuestMsg::Output {
        id: u64::MAX,
        stream: Stream::Stderr,
        data: vec![0xff; OUTPUT_CHUNK],
    };
    let frame = encode(&msg).unwrap();
    assert!(frame.len() - HEADER_LEN <= MAX_FRAME);
}

// ---------------------------------------------------------------------------
// Hostile payloads.
// ---------------------------------------------------------------------------

#[test]
fn garbage_payloads_give_decode_error() {
    // HostMsg variant indices: Attach 0, Welcome 1, Exec 2, Signal 3, Ping 4.
    let host: &[&[u8]] = &[
        &[],
        &[0xff],                      // unterminated varint
        &[0xff; 11],                  // overlong varint
        &[0x80],                      // unterminated varint
        &[5],                         // variant index out of range
        &[200, 1],                    // variant index out of range
        &[4],                         // Ping without its seq
        &[4, 0x80],                   // Ping, seq varint cut
        &[1, 1, 5],                   // Welcome, entropy missing
        &[1, 1, 5, 0, 0, 0],          // Welcome, entropy cut short
        &[2, 0, 1, 2, 0xc3, 0x28],    // Exec, argv[0] invalid UTF-8
        &[2, 0, 1, 5, b'a'],          // Exec, argv[0] cut short
        &[2, 0, 0, 1, 1, b'k'],       // Exec, env pair without value
        &[2, 0, 0, 0, 2],             // Exec, bad Option tag for cwd
        &[2, 0, 0, 0, 0, 0, 3],       // Exec, bad Option tag for timeout
        &[2, 0, 0, 0, 0, 1, 4, 1, 2], // Exec, stdin cut short
        &[3, 1],                      // Signal without signal
    ];
    for &p in host {
        assert!(
            matches!(decode_host(p), Err(FrameError::Decode(_))),
            "host {p:?}"
        );
    }
    let guest: &[&[u8]] = &[
        &[],
        &[0xff],
        &[0xff; 11],
        &[0x80],
        &[5],                      // variant index out of range
        &[4],                      // Pong without its seq
        &[4, 0x80, 0x80],          // Pong, seq varint cut
        &[0, 1, 5, b'a'],          // Hello, string cut short
        &[0, 1, 1, 0xff, 0],       // Hello, invalid UTF-8
        &[2, 7, 9],                // Exit, bad ExitStatus variant
        &[2, 7],                   // Exit without status
        &[2, 7, 3, 2, 0xc3, 0x28], // Exit, SpawnFailed invalid UTF-8
        &[1, 0, 2, 0],             // Output, bad Stream variant
        &[1, 0, 0, 5, 1, 2],       // Output, data cut short
        &[3, 0, 2, 0xc3, 0x28],    // Error, invalid UTF-8
    ];
    for &p in guest {
        assert!(
            matches!(decode_guest(p), Err(FrameError::Decode(_))),
            "guest {p:?}"
        );
    }
}

/// Cut points worth trying in a payload of `len` bytes: all of them for small
/// payloads, the first and last 300 for big ones (the middle of a long byte
/// string is all alike).
fn cuts(len: usize) -> impl Iterator<Item = usize> {
    (0..len).filter(move |&c| c < 300 || c + 300 >= len)
}

#[test]
fn every_truncation_of_a_valid_payload_errors() {
    for msg in host_msgs() {
        let p = encode(&msg).unwrap().split_off(HEADER_LEN);
        for cut in cuts(p.len()) {
            assert!(
                matches!(decode_host(&p[..cut]), Err(FrameError::Decode(_))),
                "{msg:?} cut {cut}"
            );
        }
    }
    for msg in guest_msgs() {
        let p = encode(&msg).unwrap().split_off(HEADER_LEN);
        for cut in cuts(p.len()) {
            assert!(
                matches!(decode_guest(&p[..cut]), Err(FrameError::Decode(_))),
                "cut {cut}"
            );
        }
    }
}

#[test]
fn byte_flips_never_panic() {
    // Cheap deterministic mutation pass; the proptest suite does the rest.
    for msg in host_msgs().iter().take(5) {
        let p = encode(msg).unwrap().split_off(HEADER_LEN);
        for i in 0..p.len().min(256) {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut q = p.clone();
                q[i] = v;
                let _ = decode_host(&q);
                let _ = decode_guest(&q);
            }
        }
    }
}

/// Postcard varint of `n`.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

#[test]
fn huge_claimed_lengths_error_without_allocating() {
    const FOUR_GIB: u64 = 4 << 30;
    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    for claim in [FOUR_GIB, u32::MAX as u64, u64::MAX, MAX_FRAME as u64 + 1] {
        // GuestMsg::Output { id: 0, stream: Stdout, data: <claim> bytes }
        let mut p = vec![1, 0, 0];
        p.extend(varint(claim));
        p.extend_from_slice(&[0xaa; 16]);
        cases.push(("Output.data", p, false));

        // GuestMsg::Error { id: 0, message: <claim> bytes }
        let mut p = vec![3, 0];
        p.extend(varint(claim));
        p.extend_from_slice(b"abc");
        cases.push(("Error.message", p, false));

        // HostMsg::Exec { id: 0, argv: <claim> strings }
        let mut p = vec![2, 0];
        p.extend(varint(claim));
        p.extend_from_slice(&[1, b'x', 1, b'y']);
        cases.push(("Exec.argv", p, true));

        // HostMsg::Exec { id: 0, argv: [], env: <claim> pairs }
        let mut p = vec![2, 0, 0];
        p.extend(varint(claim));
        p.extend_from_slice(&[1, b'k', 1, b'v']);
        cases.push(("Exec.env", p, true));

        // HostMsg::Exec { .., cwd: None, stdin: Some(<claim> bytes) }
        let mut p = vec![2, 0, 0, 0, 0, 1];
        p.extend(varint(claim));
        p.extend_from_slice(&[0; 8]);
        cases.push(("Exec.stdin", p, true));
    }
    for (what, p, host) in cases {
        let (res, largest) = largest_alloc(|| {
            if host {
                decode_host(&p).map(|_| ())
            } else {
                decode_guest(&p).map(|_| ())
            }
        });
        assert!(
            matches!(res, Err(FrameError::Decode(_))),
            "{what} {p:?}: {res:?}"
        );
        assert!(largest < 4096, "{what} {p:?}: allocated {largest} bytes");
    }
}

#[test]
fn decode_memory_is_bounded_by_payload_size() {
    // A length claim that the payload could in principle back (each element
    // at least one byte) but that is then cut short.
    let n = 100_000u64;
    let mut p = vec![2, 0]; // HostMsg::Exec { id: 0, argv: <n strings> .. }
    p.extend(varint(n));
    p.resize(p.len() + n as usize - 1, 0); // n-1 empty strings: one short
    let (res, largest) = largest_alloc(|| decode_host(&p));
    assert!(matches!(res, Err(FrameError::Decode(_))));
    // Each element costs at least one payload byte and 24 bytes in memory;
    // with Vec doubling that stays well under 64x the payload.
    assert!(
        largest <= 64 * p.len(),
        "allocated {largest} bytes for {} payload bytes",
        p.len()
    );
}

// ---------------------------------------------------------------------------
// I/O behaviour of read_frame.
// ---------------------------------------------------------------------------

/// Returns one byte per call, with an `Interrupted` error before each.
struct Trickle<'a> {
    data: &'a [u8],
    interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if self.data.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.data[0];
        self.data = &self.data[1..];
        Ok(1)
    }
}

#[test]
fn read_frame_handles_short_reads_and_eintr() {
    let msgs = host_msgs();
    let mut stream = Vec::new();
    for m in &msgs {
        write_frame(&mut stream, m).unwrap();
    }
    let mut r = Trickle {
        data: &stream,
        interrupt: false,
    };
    for m in &msgs {
        assert_eq!(
            &decode_host(&read_frame(&mut r).unwrap().unwrap()).unwrap(),
            m
        );
    }
    assert!(read_frame(&mut r).unwrap().is_none());
}

#[test]
fn read_frame_propagates_io_errors() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"))
        }
    }
    match read_frame(&mut Broken) {
        Err(FrameError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("{other:?}"),
    }
}

#[test]
fn read_frame_empty_stream_is_clean_eof() {
    let mut r: &[u8] = &[];
    assert!(read_frame(&mut r).unwrap().is_none());
}

// ---------------------------------------------------------------------------
// Small pieces of API.
// ---------------------------------------------------------------------------

#[test]
fn shell_code_mapping() {
    assert_eq!(ExitStatus::Exited(0).shell_code(), 0);
    assert_eq!(ExitStatus::Exited(1).shell_code(), 1);
    assert_eq!(ExitStatus::Exited(255).shell_code(), 255);
    assert_eq!(ExitStatus::Exited(-1).shell_code(), -1);
    assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);
    assert_eq!(ExitStatus::Signaled(15).shell_code(), 143);
    assert_eq!(ExitStatus::Signaled(2).shell_code(), 130);
    assert_eq!(ExitStatus::TimedOut.shell_code(), 124);
    assert_eq!(ExitStatus::SpawnFailed("enoent".into()).shell_code(), 127);
    assert_eq!(ExitStatus::SpawnFailed(String::new()).shell_code(), 127);
}

#[test]
fn shell_code_hostile_signal_does_not_overflow() {
    // These come from the untrusted guest; must not panic (debug overflow).
    assert_eq!(ExitStatus::Signaled(i32::MAX).shell_code(), i32::MAX);
    assert_eq!(ExitStatus::Signaled(i32::MAX - 127).shell_code(), i32::MAX);
    assert_eq!(ExitStatus::Signaled(i32::MIN).shell_code(), i32::MIN + 128);
    let _ = ExitStatus::Signaled(-128).shell_code();
}

#[test]
fn entropy_bytes_round_trip() {
    let mut b = [0u8; 64];
    for (i, x) in b.iter_mut().enumerate() {
        *x = i as u8;
    }
    assert_eq!(Entropy::new(b).bytes(), b);
    assert_eq!(Entropy::new(b), Entropy::new(b));
    let mut c = b;
    c[63] ^= 1;
    assert_ne!(Entropy::new(b), Entropy::new(c));
}

#[test]
fn entropy_debug_hides_bytes() {
    // 0xAB = 171, 0xCD = 205: neither may show up in any formatting.
    let mut b = [0xabu8; 64];
    b[32..].fill(0xcd);
    let e = Entropy::new(b);
    for s in [format!("{e:?}"), format!("{e:#?}")] {
        assert!(!s.contains("171") && !s.contains("205"), "{s}");
        assert!(
            !s.to_lowercase().contains("ab") && !s.to_lowercase().contains("cd"),
            "{s}"
        );
    }
    let w = HostMsg::Welcome(Welcome {
        proto_version: 1,
        host_time_ns: 0,
        entropy: e,
        vm_id: "vm".into(),
    });
    for s in [format!("{w:?}"), format!("{w:#?}")] {
        assert!(!s.contains("171") && !s.contains("205"), "{s}");
        assert!(s.contains("Entropy("), "{s}");
    }
}

#[test]
fn error_messages_display() {
    let e = FrameError::TooLarge(MAX_FRAME + 1);
    assert!(e.to_string().contains(&(MAX_FRAME + 1).to_string()));
    let e = FrameError::Truncated { got: 1, want: 4 };
    assert!(e.to_string().contains("1 of 4"));
    let e = decode_host(&[0xff]).unwrap_err();
    assert!(
        std::error::Error::source(&e).is_some(),
        "Decode keeps its cause"
    );
}

#[test]
fn decoder_many_small_frames_in_one_push() {
    // 100k empty frames in one 400 KB chunk. Taking them one by one must stay
    // linear (the decoder once shifted the whole buffer per frame, which made
    // this quadratic: gigabytes of memmove for one read from the guest).
    let n = 100_000;
    let chunk = [0u8; HEADER_LEN].repeat(n);
    let mut dec = FrameDecoder::new();
    dec.push(&chunk);
    let mut count = 0;
    while let Some(p) = dec.next_frame().unwrap() {
        assert!(p.is_empty());
        count += 1;
    }
    assert_eq!(count, n);
    assert_eq!(dec.pending(), 0);
}
