use super::*;
use serde_json::json;

fn user() -> UserId {
    UserId::parse("alice").unwrap()
}

fn every_change() -> Vec<Change> {
    let mut fields = Map::new();
    fields.insert("lang".into(), json!("it"));
    vec![
        Change::Reset {
            next_seq: 1 << 40,
            handed: 7,
            idle_unix: Some(1.7e9),
        },
        Change::Reset {
            next_seq: 1,
            handed: 0,
            idle_unix: None,
        },
        Change::Frame {
            seq: 42,
            text: Utf8Bytes::from(r#"{"type":"chat","text":"ciao è"}"#),
        },
        Change::DropFrame,
        Change::Line {
            who: Who::Human,
            text: Arc::from("hello"),
            unix: 1.7e9,
        },
        Change::Line {
            who: Who::Ai,
            text: Arc::from(""),
            unix: 0.5,
        },
        Change::ForgetLine,
        Change::Handed { seq: u64::MAX },
        Change::Accepted(ClientMessage {
            text: "hi".into(),
            id: Some("c-1".into()),
            fields,
        }),
        Change::Accepted(ClientMessage {
            text: String::new(),
            id: None,
            fields: Map::new(),
        }),
        Change::Finished { seq: 3 },
        Change::Answered {
            id: "c-1".into(),
            seq: 3,
        },
        Change::Attached,
        Change::Idle { unix: 12.5 },
        Change::Gone,
    ]
}

#[test]
fn every_change_round_trips() {
    let mut buf = Vec::new();
    for change in every_change() {
        buf.clear();
        let len = encode(Some(&user()), &change, &mut buf).unwrap();
        assert_eq!(len, buf.len());
        assert_eq!(
            decode(&buf),
            Decoded::Record {
                user: Some(user()),
                change,
                len
            }
        );
    }
    buf.clear();
    let len = encode(None, &Change::Clean, &mut buf).unwrap();
    assert_eq!(
        decode(&buf),
        Decoded::Record {
            user: None,
            change: Change::Clean,
            len
        }
    );
}

#[test]
fn a_torn_record_is_short_and_a_changed_byte_is_damage() {
    let mut buf = Vec::new();
    encode(Some(&user()), &every_change()[2], &mut buf).unwrap();
    for cut in 0..buf.len() {
        assert_eq!(decode(&buf[..cut]), Decoded::Short, "cut at {cut}");
    }
    for i in 4..buf.len() {
        let mut bad = buf.clone();
        bad[i] ^= 0x20;
        assert_eq!(decode(&bad), Decoded::Damaged, "byte {i}");
    }
    assert_eq!(
        decode(&[0; 16]),
        Decoded::Damaged,
        "zeroes (a hole after a crash)"
    );
    assert_eq!(
        decode(&[0xff; 16]),
        Decoded::Damaged,
        "a length past the bound"
    );
}

#[test]
fn a_payload_with_a_good_checksum_but_bad_fields_is_damage() {
    // A valid checksum over nonsense: an unknown tag, a bad user id, trailing bytes.
    for payload in [&[99u8, 1, b'a'][..], &[GONE, 1, b'!'], &[GONE, 1, b'a', 0]] {
        let mut buf = (payload.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&crate::store::record::crc32(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        assert_eq!(decode(&buf), Decoded::Damaged, "{payload:?}");
    }
}

#[test]
fn random_bytes_never_panic() {
    // A small xorshift generator: repeatable, and no dependency for it.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut good = Vec::new();
    for change in every_change() {
        encode(Some(&user()), &change, &mut good).unwrap();
    }
    for _ in 0..20_000 {
        let mut buf = good.clone();
        for _ in 0..(next() % 4) {
            let i = (next() as usize) % buf.len();
            buf[i] = next() as u8;
        }
        let start = (next() as usize) % buf.len();
        let _ = decode(&buf[start..]);
        // With a recomputed checksum, the payload parser itself sees the damage.
        if let Some(len) = announced_len(&buf[start..]).filter(|l| start + 8 + l <= buf.len()) {
            let crc = crate::store::record::crc32(&buf[start + 8..start + 8 + len]);
            buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
            let _ = decode(&buf[start..]);
        }
    }
}

#[test]
fn the_checksum_is_zlibs_crc32_as_before() {
    // The check value of CRC-32/ISO-HDLC: journals written with crc32fast still read.
    assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
}
