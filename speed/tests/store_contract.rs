//! One contract, run against every state store: the in-memory one and a real Redis.

use std::time::Duration;

use duet_speed::store::{CasWrite, HistoryWrite, MemoryStore, RedisStore, StateStore, Versioned};

fn redis_url() -> String {
    std::env::var("DUET_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix(stem: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("contract-{stem}-{}-{t}:", std::process::id())
}

fn stored_value(version: u64, bytes: &[u8]) -> Option<Versioned> {
    Some(Versioned {
        version,
        bytes: bytes.to_vec(),
    })
}

async fn contract<S: StateStore>(store: &S, p: &str) {
    let k = |n: &str| format!("{p}{n}");
    let w = |key: String, expected: Option<u64>, value: Option<&[u8]>, ttl_ms: u64| CasWrite {
        key,
        expected,
        value: value.map(<[u8]>::to_vec),
        ttl_ms,
        history: None,
    };
    // Absent keys read as none; creation requires absence.
    assert_eq!(
        store.get_many(&[k("a"), k("b")]).await.unwrap(),
        vec![None, None]
    );
    assert_eq!(
        store
            .put_many(&[
                w(k("a"), None, Some(b"one"), 60_000),
                w(k("b"), Some(1), Some(b"x"), 60_000)
            ])
            .await
            .unwrap(),
        vec![true, false]
    );
    let got = store.get_many(&[k("a")]).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().version, 1);
    assert_eq!(got[0].as_ref().unwrap().bytes, b"one");
    // A stale version loses; the current one wins and bumps the version.
    assert_eq!(
        store
            .put_many(&[w(k("a"), None, Some(b"lost"), 60_000)])
            .await
            .unwrap(),
        vec![false]
    );
    assert_eq!(
        store
            .put_many(&[w(k("a"), Some(1), Some(b"two"), 60_000)])
            .await
            .unwrap(),
        vec![true]
    );
    assert_eq!(
        store
            .put_many(&[w(k("a"), Some(1), Some(b"lost"), 60_000)])
            .await
            .unwrap(),
        vec![false]
    );
    let got = store.get_many(&[k("a")]).await.unwrap();
    assert_eq!(
        (
            got[0].as_ref().unwrap().version,
            got[0].as_ref().unwrap().bytes.as_slice()
        ),
        (2, &b"two"[..])
    );
    // Deleting is a conditional write too.
    assert_eq!(
        store
            .put_many(&[w(k("a"), Some(2), None, 1)])
            .await
            .unwrap(),
        vec![true]
    );
    assert_eq!(store.get_many(&[k("a")]).await.unwrap(), vec![None]);
    // Values expire.
    assert_eq!(
        store
            .put_many(&[w(k("short"), None, Some(b"x"), 50)])
            .await
            .unwrap(),
        vec![true]
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.get_many(&[k("short")]).await.unwrap(), vec![None]);
    // Keys by prefix, counters, claims and text fields.
    store
        .put_many(&[
            w(k("s:u1"), None, Some(b"1"), 60_000),
            w(k("s:u2"), None, Some(b"2"), 60_000),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.keys(&k("s:")).await.unwrap(),
        vec![k("s:u1"), k("s:u2")]
    );
    // Histories: appended with their state's write, atomically (only when it applies), created
    // with their header, read in the same round trip as the states (an absent one as
    // nothing), expiring like states.
    let hw = |key: &str, records: &[u8], header: &[u8], ttl_ms: u64| HistoryWrite {
        key: k(key),
        records: records.to_vec(),
        header: header.to_vec(),
        ttl_ms,
    };
    let with = |mut write: CasWrite, history: HistoryWrite| {
        write.history = Some(history);
        write
    };
    let h = |records: &[u8], header: &[u8], ttl_ms: u64| hw("h:{t}u3", records, header, ttl_ms);
    let s3 = || k("s:{t}u3");
    let put = |writes: Vec<CasWrite>| async move { store.put_many(&writes).await.unwrap() };
    assert_eq!(
        put(vec![with(
            w(s3(), None, Some(b"A"), 60_000),
            h(b"ab", b"H1", 60_000)
        )])
        .await,
        vec![true]
    );
    // A write that loses appends nothing.
    assert_eq!(
        put(vec![with(
            w(s3(), None, Some(b"X"), 60_000),
            h(b"zz", b"H9", 60_000)
        )])
        .await,
        vec![false]
    );
    // An existing history keeps its header: only the records are appended.
    assert_eq!(
        put(vec![with(
            w(s3(), Some(1), Some(b"B"), 60_000),
            h(b"cd", b"H2", 60_000)
        )])
        .await,
        vec![true]
    );
    let read = || {
        let keys = [s3(), k("s:{t}none")];
        let histories = [k("h:{t}u3"), k("h:{t}none")];
        async move {
            store
                .get_many_with_history(&keys, &histories)
                .await
                .unwrap()
        }
    };
    let (values, histories) = read().await;
    assert_eq!(values, vec![stored_value(2, b"B"), None]);
    assert_eq!(histories, vec![b"H1abcd".to_vec(), Vec::new()]);
    assert_eq!(
        store.keys(&k("h:")).await.unwrap(),
        vec![k("h:{t}u3")],
        "history keys are listed by prefix"
    );
    // A deletion carries its history too, and so does a write that keeps its key absent.
    assert_eq!(
        put(vec![
            with(w(s3(), Some(2), None, 1), h(b"ef", b"H3", 60_000)),
            with(
                w(k("s:{t}u4"), None, None, 1),
                hw("h:{t}u4", b"gh", b"H4", 60_000)
            ),
        ])
        .await,
        vec![true, true]
    );
    let (values, histories) = store
        .get_many_with_history(&[s3(), k("s:{t}u4")], &[k("h:{t}u3"), k("h:{t}u4")])
        .await
        .unwrap();
    assert_eq!(values, vec![None, None]);
    assert_eq!(histories, vec![b"H1abcdef".to_vec(), b"H4gh".to_vec()]);
    // Each write sets the expiry, its own, apart from the state's: an existing history's and
    // a new one's; an expired history starts again from its header.
    assert_eq!(
        put(vec![
            with(w(s3(), None, Some(b"C"), 60_000), h(b"", b"H5", 50)),
            with(
                w(k("s:{t}u5"), None, Some(b"E"), 60_000),
                hw("h:{t}u5", b"kl", b"H7", 50)
            ),
        ])
        .await,
        vec![true, true]
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(read().await.1[0], Vec::<u8>::new());
    assert_eq!(
        store
            .get_many_with_history(&[k("s:{t}u5")], &[k("h:{t}u5")])
            .await
            .unwrap(),
        (vec![stored_value(1, b"E")], vec![Vec::new()])
    );
    assert_eq!(
        put(vec![with(
            w(s3(), Some(1), Some(b"D"), 60_000),
            h(b"ij", b"H6", 60_000)
        )])
        .await,
        vec![true]
    );
    assert_eq!(read().await.1[0], b"H6ij".to_vec());
    // Many writes in one call, over many hash slots (more than one call's worth in some),
    // with and without histories, creations among them; every third one loses and appends
    // nothing.
    let many: Vec<CasWrite> = (0..300)
        .map(|i| {
            let tag = if i % 2 == 0 {
                "slot".to_string()
            } else {
                format!("m{i}")
            };
            let state = w(
                k(&format!("s:{{{tag}}}m{i}")),
                (i % 3 == 2).then_some(5),
                Some(b"v"),
                60_000,
            );
            if i % 5 == 4 {
                state
            } else {
                with(
                    state,
                    hw(
                        &format!("h:{{{tag}}}m{i}"),
                        format!("r{i}").as_bytes(),
                        b"H",
                        60_000,
                    ),
                )
            }
        })
        .collect();
    let answers = store.put_many(&many).await.unwrap();
    let keys: Vec<String> = many.iter().map(|w| w.key.clone()).collect();
    let history_keys: Vec<String> = keys.iter().map(|k| k.replacen("s:{", "h:{", 1)).collect();
    let (states, read_many) = store
        .get_many_with_history(&keys, &history_keys)
        .await
        .unwrap();
    for (i, ((ok, state), bytes)) in answers.iter().zip(&states).zip(&read_many).enumerate() {
        let applies = i % 3 != 2;
        assert_eq!(*ok, applies, "{}", keys[i]);
        assert_eq!(state.is_some(), applies, "{}", keys[i]);
        let expected = if applies && i % 5 != 4 {
            format!("Hr{i}").into_bytes()
        } else {
            Vec::new()
        };
        assert_eq!(bytes, &expected, "{}", history_keys[i]);
    }
    // The same store through a connection of its own reads and writes the same keys.
    let other = store.own_connection().await.unwrap();
    let stored = |version: u64, bytes: &[u8]| {
        vec![Some(Versioned {
            version,
            bytes: bytes.to_vec(),
        })]
    };
    assert_eq!(other.get_many(&[k("s:u1")]).await.unwrap(), stored(1, b"1"));
    assert_eq!(
        other
            .put_many(&[w(k("s:u1"), Some(1), Some(b"3"), 60_000)])
            .await
            .unwrap(),
        vec![true]
    );
    assert_eq!(store.get_many(&[k("s:u1")]).await.unwrap(), stored(2, b"3"));
    store
        .add_counters(&k("stats"), &[("late".into(), 2), ("applied".into(), 5)])
        .await
        .unwrap();
    store
        .add_counters(&k("stats"), &[("late".into(), 1)])
        .await
        .unwrap();
    let c = store.counters(&k("stats")).await.unwrap();
    assert_eq!((c["late"], c["applied"]), (3, 5));
    assert_eq!(store.claim(&k("spec"), "abc").await.unwrap(), "abc");
    assert_eq!(store.claim(&k("spec"), "def").await.unwrap(), "abc");
    store
        .set_fields(&k("wm"), &[("0.last".into(), "5:100".into())])
        .await
        .unwrap();
    store
        .set_fields(
            &k("wm"),
            &[
                ("0.prev".into(), "5:100".into()),
                ("0.last".into(), "9:200".into()),
            ],
        )
        .await
        .unwrap();
    let f = store.fields(&k("wm")).await.unwrap();
    assert_eq!(
        (f["0.prev"].as_str(), f["0.last"].as_str()),
        ("5:100", "9:200")
    );
    // Many writes at once, some sharing a hash slot (more than one call's worth), some not:
    // each answer belongs to its own write.
    let many: Vec<String> = (0..300)
        .map(|i| {
            if i % 2 == 0 {
                k(&format!("{{slot}}:m{i}"))
            } else {
                k(&format!("m{i}"))
            }
        })
        .collect();
    let first: Vec<CasWrite> = many
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .map(|(_, key)| w(key.clone(), None, Some(b"v1"), 60_000))
        .collect();
    assert!(store.put_many(&first).await.unwrap().iter().all(|ok| *ok));
    // Keys written above expect version 1; the rest must be absent, so every third write of
    // this mix is stale in one way or the other.
    let mixed: Vec<CasWrite> = many
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let expected = match i % 6 {
                0 => Some(1),
                3 => None,
                1 | 4 => None,
                _ => Some(7),
            };
            w(
                key.clone(),
                expected,
                Some(format!("v{i}").as_bytes()),
                60_000,
            )
        })
        .collect();
    let answers = store.put_many(&mixed).await.unwrap();
    for (i, ok) in answers.iter().enumerate() {
        let should = match i % 6 {
            0 => true,
            3 => false,
            1 | 4 => true,
            _ => false,
        };
        assert_eq!(*ok, should, "write {i} to {}", many[i]);
    }
    let got = store.get_many(&many).await.unwrap();
    for (i, v) in got.iter().enumerate() {
        let bytes = v.as_ref().map(|v| v.bytes.clone());
        let want: Option<Vec<u8>> = match i % 6 {
            0 | 1 | 4 => Some(format!("v{i}").into_bytes()),
            3 => Some(b"v1".to_vec()),
            _ => None,
        };
        assert_eq!(bytes, want, "key {}", many[i]);
    }
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(&MemoryStore::new(), &prefix("mem")).await;
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let store = RedisStore::connect(&redis_url(), Duration::from_secs(5))
        .await
        .expect("Redis answers at DUET_TEST_REDIS (CI starts it)");
    let p = prefix("redis");
    contract(&store, &p).await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}*"))
        .query(&mut con)
        .unwrap();
    for k in keys {
        let _: () = redis::cmd("DEL").arg(k).query(&mut con).unwrap();
    }
}

#[tokio::test]
async fn an_unreachable_redis_fails_fast() {
    let started = std::time::Instant::now();
    let err = RedisStore::connect("redis://127.0.0.1:1/0", Duration::from_millis(300))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_lazy_store_waits_for_its_first_connection() {
    // The server's store connects in the background; a request that arrives before the
    // connection is made waits for it instead of failing (its own timeout bounds the wait).
    let store = RedisStore::connect_lazily(&redis_url(), Duration::from_secs(5)).unwrap();
    let p = prefix("lazy");
    assert_eq!(
        store.get_many(&[format!("{p}absent")]).await.unwrap(),
        vec![None]
    );
}

#[tokio::test]
async fn a_lazy_store_fails_fast_once_its_first_attempt_failed() {
    let store =
        RedisStore::connect_lazily("redis://127.0.0.1:1/0", Duration::from_millis(300)).unwrap();
    let err = store.get_many(&["k".to_string()]).await.unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(err.to_string().contains("retrying"), "{err}");
    // Retries go on in the background; meanwhile calls fail at once.
    let started = std::time::Instant::now();
    assert!(store.get_many(&["k".to_string()]).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(250));
}
