//! The queue against a real `redis-server` per test (see `common/redis_server.rs`).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::redis_server::RedisServer;
use popcon_worker::job::{Action, Lane, ValidJob};
use popcon_worker::queue::{
    DeadLetterOutcome, OFF_HOURS_MAX_TTL, OwnedOutcome, Queue, QueueConfig, QueueError,
    ServerWarning,
};
use redis::aio::MultiplexedConnection;

fn config(server: &RedisServer, consumer: &str) -> QueueConfig {
    QueueConfig {
        redis_url: server.url(),
        consumer: consumer.to_string(),
        lease: Duration::from_millis(800),
        block: Duration::from_millis(300),
        connect_patience: Duration::from_secs(5),
        ..QueueConfig::default()
    }
}

async fn queue(server: &RedisServer, consumer: &str) -> Queue {
    Queue::connect(config(server, consumer))
        .await
        .expect("connect to the test redis")
}

async fn queue_with(cfg: QueueConfig) -> Queue {
    Queue::connect(cfg)
        .await
        .expect("connect to the test redis")
}

async fn raw(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn job(job_id: &str, action: Action, idx: Option<u32>) -> ValidJob {
    ValidJob {
        v: 1,
        job_id: job_id.to_string(),
        user_id: "u1".to_string(),
        action,
        idx,
        fence: 1,
        enqueued_at: Utc::now(),
    }
}

/// `XPENDING <stream> workers` summary count.
async fn pending(c: &mut MultiplexedConnection, stream: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("workers")
        .query_async(c)
        .await
        .unwrap();
    match v {
        redis::Value::Array(a) => match &a[0] {
            redis::Value::Int(n) => *n,
            other => panic!("XPENDING count: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

/// The consumer that owns a pending entry, if any.
async fn owner(c: &mut MultiplexedConnection, stream: &str, id: &str) -> Option<String> {
    let v: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("workers")
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(c)
        .await
        .unwrap();
    v.into_iter().next().map(|(_, consumer, _, _)| consumer)
}

async fn xlen(c: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("XLEN").arg(key).query_async(c).await.unwrap()
}

async fn pttl(c: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(c).await.unwrap()
}

const INTERACTIVE: &str = "popcon:jobs:interactive";
const BULK: &str = "popcon:jobs:bulk";

#[tokio::test]
async fn group_creation_is_idempotent_and_keeps_entries_enqueued_before_it() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    // The API enqueued before any worker ever ran: the stream exists, the group does not.
    let early: String = redis::cmd("XADD")
        .arg(INTERACTIVE)
        .arg("*")
        .arg("job")
        .arg(job("j0", Action::Retry, Some(0)).to_json())
        .query_async(&mut c)
        .await
        .unwrap();
    let q = queue(&server, "a").await;
    q.ensure_groups().await.unwrap();
    q.ensure_groups().await.unwrap();
    for stream in [INTERACTIVE, BULK] {
        let groups: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(
            format!("{groups:?}").contains("workers"),
            "{stream}: {groups:?}"
        );
    }
    let d = q.claim_next(true).await.unwrap().expect("the early entry");
    assert_eq!(d.id, early);
    assert_eq!(d.job().unwrap().job_id, "j0");
}

#[tokio::test]
async fn interactive_is_read_before_bulk() {
    let server = RedisServer::start();
    let q = queue(&server, "a").await;
    let bulk = q
        .enqueue(&job("j1", Action::GenerateSet, None))
        .await
        .unwrap();
    let interactive = q.enqueue(&job("j2", Action::Retry, Some(1))).await.unwrap();
    let first = q.claim_next(true).await.unwrap().unwrap();
    assert_eq!(
        (first.lane, first.id.as_str()),
        (Lane::Interactive, interactive.as_str())
    );
    assert_eq!(first.delivery_count, 1);
    let second = q.claim_next(true).await.unwrap().unwrap();
    assert_eq!(
        (second.lane, second.id.as_str()),
        (Lane::Bulk, bulk.as_str())
    );
    assert_eq!(second.job().unwrap().action, Action::GenerateSet);
    assert!(q.claim_next(true).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_keeps_a_long_job_from_being_reclaimed() {
    let server = RedisServer::start();
    let a = queue(&server, "a").await;
    let b = queue(&server, "b").await;
    a.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    let d = a.claim_next(true).await.unwrap().unwrap();
    let lease = a.start_lease(&d, None);
    // Five lease lengths of "work" while another worker keeps trying to reclaim.
    let until = Instant::now() + a.config().lease * 5;
    while Instant::now() < until {
        let taken = b.reclaim_idle(10, true).await.unwrap();
        assert!(
            taken.deliveries.is_empty(),
            "a live job was reclaimed: {taken:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!lease.is_lost(), "{:?}", lease.status());
    lease.stop();
    let mut c = raw(&server).await;
    assert_eq!(
        owner(&mut c, INTERACTIVE, &d.id).await.as_deref(),
        Some("a")
    );
    assert!(a.ack(&d).await.unwrap());
    assert!(
        !a.ack(&d).await.unwrap(),
        "a second ack finds nothing pending"
    );
    assert_eq!(pending(&mut c, INTERACTIVE).await, 0);
}

#[tokio::test]
async fn a_crashed_consumers_entry_is_reclaimed_after_the_lease() {
    let server = RedisServer::start();
    let a = queue(&server, "a").await;
    let b = queue(&server, "b").await;
    a.enqueue(&job("j1", Action::Regenerate, Some(2)))
        .await
        .unwrap();
    let d = a.claim_next(true).await.unwrap().unwrap();
    // "a" crashes: no renewal. Before the lease is over nobody may take it.
    assert!(
        b.reclaim_idle(10, true)
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );
    tokio::time::sleep(b.config().lease + Duration::from_millis(200)).await;
    let taken = b.reclaim_idle(10, true).await.unwrap();
    assert_eq!(taken.deliveries.len(), 1, "{taken:?}");
    let r = &taken.deliveries[0];
    assert_eq!(
        (r.id.as_str(), r.lane, r.delivery_count),
        (d.id.as_str(), Lane::Interactive, 2)
    );
    assert_eq!(r.fields, d.fields);
    // A stale "a" can neither renew nor dead-letter it now.
    assert_eq!(
        a.renew(&d).await.unwrap(),
        OwnedOutcome::OwnedBy("b".into())
    );
    assert_eq!(
        a.dead_letter(&d, "stale").await.unwrap(),
        DeadLetterOutcome::OwnedBy("b".into())
    );
    // And a lease started by the stale worker reports the loss.
    let lease = a.start_lease(&d, None);
    let why = tokio::time::timeout(Duration::from_secs(3), lease.lost())
        .await
        .expect("the stale lease notices");
    assert!(why.contains("OwnedBy"), "{why}");
}

#[tokio::test]
async fn own_pending_is_reread_after_a_restart() {
    let server = RedisServer::start();
    let a = queue(&server, "a").await;
    a.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    a.enqueue(&job("j2", Action::GenerateSet, None))
        .await
        .unwrap();
    let d1 = a.claim_next(true).await.unwrap().unwrap();
    let d2 = a.claim_next(true).await.unwrap().unwrap();
    drop(a);
    // Another consumer has nothing of its own.
    let b = queue(&server, "b").await;
    assert!(b.own_pending(10, true).await.unwrap().deliveries.is_empty());
    // The same consumer name after a restart gets both back, interactive first, no waiting.
    let a2 = queue(&server, "a").await;
    let mine = a2.own_pending(10, true).await.unwrap();
    let ids: Vec<_> = mine.deliveries.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, vec![d1.id.clone(), d2.id.clone()]);
    assert!(mine.deliveries.iter().all(|d| d.delivery_count == 2));
    assert_eq!(mine.deliveries[0].fields, d1.fields);
}

#[tokio::test]
async fn an_entry_deleted_while_pending_is_reported_not_dropped_silently() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let a = queue(&server, "a").await;
    let b = queue(&server, "b").await;
    a.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    a.enqueue(&job("j2", Action::Retry, Some(1))).await.unwrap();
    a.enqueue(&job("j3", Action::Retry, Some(2))).await.unwrap();
    let d1 = a.claim_next(true).await.unwrap().unwrap();
    let d2 = a.claim_next(true).await.unwrap().unwrap();
    let d3 = a.claim_next(true).await.unwrap().unwrap();
    for d in [&d1, &d3] {
        let _: i64 = redis::cmd("XDEL")
            .arg(INTERACTIVE)
            .arg(&d.id)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    // Reclaim after a crash reports the deleted one and takes the other.
    tokio::time::sleep(b.config().lease + Duration::from_millis(200)).await;
    let taken = b.reclaim_idle(10, true).await.unwrap();
    let deleted: HashSet<_> = taken.deleted.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        deleted,
        HashSet::from([d1.id.clone(), d3.id.clone()]),
        "{taken:?}"
    );
    assert!(taken.deleted.iter().all(|e| e.lane == Lane::Interactive));
    assert_eq!(taken.deliveries.len(), 1);
    assert_eq!(taken.deliveries[0].id, d2.id);
    // Nothing lingers in the pending list but the live one.
    assert_eq!(pending(&mut c, INTERACTIVE).await, 1);

    // Own-pending re-reads report deletions too, and so does a lease renewal.
    a.enqueue(&job("j4", Action::Retry, Some(3))).await.unwrap();
    a.enqueue(&job("j5", Action::Retry, Some(4))).await.unwrap();
    let d4 = a.claim_next(true).await.unwrap().unwrap();
    let d5 = a.claim_next(true).await.unwrap().unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg(INTERACTIVE)
        .arg(&d4.id)
        .query_async(&mut c)
        .await
        .unwrap();
    let mine = a.own_pending(10, true).await.unwrap();
    assert_eq!(mine.deleted.len(), 1);
    assert_eq!(mine.deleted[0].id, d4.id);
    let _: i64 = redis::cmd("XDEL")
        .arg(INTERACTIVE)
        .arg(&d5.id)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(a.renew(&d5).await.unwrap(), OwnedOutcome::Deleted);
}

#[tokio::test]
async fn dead_letters_carry_fields_reason_and_count_atomically_and_requeue() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let a = queue(&server, "a").await;
    let b = queue(&server, "b").await;
    a.enqueue_raw(Lane::Interactive, &[("job", "not json"), ("trace", "t-1")])
        .await
        .unwrap();
    let d = a.claim_next(true).await.unwrap().unwrap();
    let reason = d.job().unwrap_err().to_string();
    // Only the owner may dead-letter.
    assert_eq!(
        b.dead_letter(&d, &reason).await.unwrap(),
        DeadLetterOutcome::OwnedBy("a".into())
    );
    assert_eq!(xlen(&mut c, "popcon:jobs:dead").await, 0);
    let DeadLetterOutcome::DeadLettered(dead_id) = a.dead_letter(&d, &reason).await.unwrap() else {
        panic!("not dead-lettered");
    };
    // Acked in the same step, and a repeat writes no second dead letter.
    assert_eq!(pending(&mut c, INTERACTIVE).await, 0);
    assert_eq!(
        a.dead_letter(&d, &reason).await.unwrap(),
        DeadLetterOutcome::NotPending
    );
    assert_eq!(xlen(&mut c, "popcon:jobs:dead").await, 1);

    let dead = a.dead_list(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let l = &dead[0];
    assert_eq!(l.id, dead_id);
    assert_eq!(l.lane, Some(Lane::Interactive));
    assert_eq!(l.original_id, d.id);
    assert_eq!(l.delivery_count, 1);
    assert!(l.reason.contains("not valid JSON"), "{}", l.reason);
    assert!(chrono::DateTime::parse_from_rfc3339(&l.dead_at).is_ok());
    assert_eq!(l.fields, d.fields);
    assert_eq!(a.depth().await.unwrap().dead, 1);

    let (lane, new_id) = a.dead_requeue(&dead_id).await.unwrap();
    assert_eq!(lane, Lane::Interactive);
    assert_eq!(xlen(&mut c, "popcon:jobs:dead").await, 0);
    let again = a.claim_next(true).await.unwrap().unwrap();
    assert_eq!(again.id, new_id);
    assert_eq!(again.fields, d.fields);
    assert_eq!(again.delivery_count, 1);
    assert!(matches!(
        a.dead_requeue(&dead_id).await,
        Err(QueueError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_has_one_winner_among_20_and_only_the_holder_renews_or_releases() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let mut queues = Vec::new();
    for i in 0..4 {
        queues.push(queue(&server, &format!("w{i}")).await);
    }
    let j = job("j1", Action::Retry, Some(7));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let q = queues[i % 4].clone();
            let j = j.clone();
            tokio::spawn(async move { q.acquire_run(&j).await.unwrap() })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(g) = t.await.unwrap() {
            winners.push(g);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one acquirer wins");
    let first = winners.pop().unwrap();
    assert_eq!(first.key(), "popcon:run:j1:retry:7");
    let ttl = pttl(&mut c, first.key()).await;
    assert!(ttl > 0 && ttl <= 800, "PX lease: {ttl}");
    assert!(first.renew().await.unwrap());

    // Let it lapse; another worker takes it; the old holder can neither renew nor release.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = queues[1]
        .acquire_run(&j)
        .await
        .unwrap()
        .expect("free after expiry");
    assert!(!first.renew().await.unwrap());
    assert!(!first.release().await.unwrap());
    let held: Option<String> = redis::cmd("GET")
        .arg(second.key())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(held.as_deref(), Some(second.token()));
    assert!(second.release().await.unwrap());
    assert!(queues[2].acquire_run(&j).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_keys_are_set_nx_with_a_30_s_ttl() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let q = queue(&server, "api").await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move {
                q.try_claim_action("j1", Action::Retry, Some(2))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1, "50 clicks, one claim");
    let key = "popcon:claim:j1:retry-2";
    let ttl: i64 = redis::cmd("TTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((28..=30).contains(&ttl), "EX 30: {ttl}");
    let v: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "1");
    // Other emoji and other actions are separate claims.
    assert!(
        q.try_claim_action("j1", Action::Retry, Some(3))
            .await
            .unwrap()
    );
    assert!(
        q.try_claim_action("j1", Action::ApproveAll, None)
            .await
            .unwrap()
    );
    assert!(
        !q.try_claim_action("j1", Action::ApproveAll, None)
            .await
            .unwrap()
    );
    // Rollback releases it so the user can click again at once.
    assert!(q.release_claim("j1", Action::Retry, Some(2)).await.unwrap());
    assert!(
        q.try_claim_action("j1", Action::Retry, Some(2))
            .await
            .unwrap()
    );
    assert!(matches!(
        q.try_claim_action("j1:x", Action::Retry, Some(2)).await,
        Err(QueueError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn off_hours_is_only_ever_set_with_a_ttl_capped_at_20_h() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let q = queue(&server, "ops").await;
    let key = "popcon:off_hours";
    assert_eq!(q.off_hours_status().await.unwrap(), None);

    // The seed's regression test, against the real key: set → TTL 72000 s.
    assert_eq!(
        q.set_off_hours(OFF_HOURS_MAX_TTL).await.unwrap(),
        Duration::from_secs(72_000)
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((71_990..=72_000).contains(&ttl), "TTL {ttl}");
    let v: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "true");

    // 48 h asked, 20 h set.
    let set = q
        .set_off_hours(Duration::from_secs(48 * 3600))
        .await
        .unwrap();
    assert_eq!(set, Duration::from_secs(72_000));
    let ttl: i64 = redis::cmd("TTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((71_990..=72_000).contains(&ttl), "capped TTL {ttl}");

    let set = q.set_off_hours(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(set, Duration::from_secs(3600));
    let left = q.off_hours_status().await.unwrap().unwrap();
    assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3590));

    assert!(matches!(
        q.set_off_hours(Duration::ZERO).await,
        Err(QueueError::InvalidArgument(_))
    ));

    // A foreign writer (the old bug) sets it without a TTL: the first look gives it the cap.
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("true")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pttl(&mut c, key).await, -1);
    let left = q.off_hours_status().await.unwrap().unwrap();
    assert!(left <= OFF_HOURS_MAX_TTL && left > Duration::from_secs(71_990));
    let ttl: i64 = redis::cmd("TTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((71_990..=72_000).contains(&ttl), "healed TTL {ttl}");
    // ... and so does a worker's claim.
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("true")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(q.claim(true, Duration::ZERO).await.unwrap().is_none());
    let ttl = pttl(&mut c, key).await;
    assert!(
        ttl > 71_990_000 && ttl <= 72_000_000,
        "healed by claim: {ttl}"
    );

    assert!(q.clear_off_hours().await.unwrap());
    assert_eq!(q.off_hours_status().await.unwrap(), None);
    assert!(!q.clear_off_hours().await.unwrap());
}

#[tokio::test]
async fn costly_entries_wait_in_the_stream_while_off_hours_is_set_and_run_after_clear() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let q = queue(&server, "a").await;
    q.set_off_hours(Duration::from_secs(3600)).await.unwrap();
    let retry = q.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    let set = q
        .enqueue(&job("j2", Action::GenerateSet, None))
        .await
        .unwrap();

    for _ in 0..3 {
        assert!(q.claim_next(true).await.unwrap().is_none());
    }
    let own = q.own_pending(10, true).await.unwrap();
    let idle = q.reclaim_idle(10, true).await.unwrap();
    assert!(own.deliveries.is_empty() && idle.deliveries.is_empty());
    // Nothing claimed, nothing acked, nothing lost.
    assert_eq!(pending(&mut c, INTERACTIVE).await, 0);
    assert_eq!(pending(&mut c, BULK).await, 0);
    assert_eq!(xlen(&mut c, INTERACTIVE).await, 1);
    assert_eq!(xlen(&mut c, BULK).await, 1);
    let depth = q.depth().await.unwrap();
    assert_eq!(
        (depth.interactive.length, depth.interactive.pending),
        (1, 0)
    );
    assert_eq!(depth.interactive.undelivered, Some(1));
    assert_eq!(depth.bulk.undelivered, Some(1));

    // A worker that was asked not to take costly work does not either, flag or no flag.
    assert!(q.clear_off_hours().await.unwrap());
    assert!(q.claim_next(false).await.unwrap().is_none());

    let first = q.claim_next(true).await.unwrap().unwrap();
    let second = q.claim_next(true).await.unwrap().unwrap();
    assert_eq!(first.id, retry);
    assert_eq!(second.id, set);
    assert_eq!(first.delivery_count, 1);
}

#[tokio::test]
async fn costly_entries_are_claimed_once_the_flag_expires() {
    let server = RedisServer::start();
    let q = queue(&server, "a").await;
    q.set_off_hours(Duration::from_secs(1)).await.unwrap();
    let id = q
        .enqueue(&job("j1", Action::GenerateSet, None))
        .await
        .unwrap();
    assert!(
        q.claim(true, Duration::from_millis(200))
            .await
            .unwrap()
            .is_none()
    );
    // One blocked claim spans the expiry: it notices within a block time.
    let started = Instant::now();
    let d = q
        .claim(true, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("claimed after the flag expired");
    assert_eq!(d.id, id);
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(2500), "waited {waited:?}");
    assert_eq!(q.off_hours_status().await.unwrap(), None);
}

#[tokio::test]
async fn approvals_animate_so_off_hours_holds_them_like_every_gpu_action() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let q = queue(&server, "a").await;
    q.set_off_hours(Duration::from_secs(3600)).await.unwrap();

    // approve and approve_all run AnimateDiff: nothing is handed out on either lane.
    let approve = q
        .enqueue(&job("j1", Action::Approve, Some(0)))
        .await
        .unwrap();
    let approve_all = q
        .enqueue(&job("j3", Action::ApproveAll, None))
        .await
        .unwrap();
    assert!(q.claim_next(true).await.unwrap().is_none());
    assert_eq!(pending(&mut c, INTERACTIVE).await, 0);
    assert_eq!(pending(&mut c, BULK).await, 0);

    // Poison (unparseable, unknown action) is held too: only what Lua can read as non-costly
    // passes the gate; it is dead-lettered after the flag goes.
    let poison = q
        .enqueue_raw(Lane::Bulk, &[("job", "{\"action\":")])
        .await
        .unwrap();
    let unknown = q
        .enqueue_raw(Lane::Interactive, &[("job", "{\"action\":\"paint\"}")])
        .await
        .unwrap();
    assert!(q.claim_next(true).await.unwrap().is_none());

    // Once the flag goes, everything comes out in lane order: interactive first.
    q.clear_off_hours().await.unwrap();
    let mut order = Vec::new();
    while let Some(d) = q.claim(true, Duration::ZERO).await.unwrap() {
        order.push(d.id.clone());
        q.ack(&d).await.unwrap();
    }
    assert_eq!(order, vec![approve, unknown, approve_all, poison]);
}

#[tokio::test]
async fn reclaim_and_own_pending_leave_costly_entries_alone_during_off_hours() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let a = queue(&server, "a").await;
    let b = queue(&server, "b").await;
    a.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    a.enqueue(&job("j2", Action::Approve, Some(0)))
        .await
        .unwrap();
    let retry = a.claim_next(true).await.unwrap().unwrap();
    let approve = a.claim_next(true).await.unwrap().unwrap();
    // "a" crashes holding both; off-hours starts.
    a.set_off_hours(Duration::from_secs(3600)).await.unwrap();
    tokio::time::sleep(b.config().lease + Duration::from_millis(200)).await;

    let mine = a.own_pending(10, true).await.unwrap();
    assert!(mine.deliveries.is_empty(), "{mine:?}");
    assert_eq!(mine.held, 2);
    let taken = b.reclaim_idle(10, true).await.unwrap();
    assert!(taken.deliveries.is_empty(), "{taken:?}");
    assert_eq!(taken.held, 2);
    assert_eq!(
        owner(&mut c, INTERACTIVE, &retry.id).await.as_deref(),
        Some("a")
    );

    b.clear_off_hours().await.unwrap();
    let taken = b.reclaim_idle(10, true).await.unwrap();
    let mut ids: Vec<&str> = taken.deliveries.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    let mut want = vec![retry.id.as_str(), approve.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    assert!(taken.deliveries.iter().all(|d| d.delivery_count == 2));
}

#[tokio::test]
async fn release_makes_an_entry_claimable_at_once_and_retry_after_waits() {
    let server = RedisServer::start();
    let long = |consumer: &str| QueueConfig {
        lease: Duration::from_secs(10),
        ..config(&server, consumer)
    };
    let a = queue_with(long("a")).await;
    let b = queue_with(long("b")).await;
    a.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    let d = a.claim_next(true).await.unwrap().unwrap();
    assert!(
        b.reclaim_idle(10, true)
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );
    // Shutdown: hand it back. Another worker takes it immediately, and the interrupted
    // attempt does not count.
    assert_eq!(a.release(&d).await.unwrap(), OwnedOutcome::Done);
    let taken = b.reclaim_idle(10, true).await.unwrap();
    assert_eq!(taken.deliveries.len(), 1);
    let d = taken.deliveries[0].clone();
    assert_eq!(d.delivery_count, 1);
    assert_eq!(
        a.release(&d).await.unwrap(),
        OwnedOutcome::OwnedBy("b".into())
    );

    // A retryable failure: back off 500 ms, counted.
    let short = |consumer: &str| QueueConfig {
        lease: Duration::from_secs(1),
        ..config(&server, consumer)
    };
    let b1 = queue_with(short("b")).await;
    let c1 = queue_with(short("c")).await;
    assert_eq!(
        b1.retry_after(&d, Duration::from_millis(500))
            .await
            .unwrap(),
        OwnedOutcome::Done
    );
    assert!(
        c1.reclaim_idle(10, true)
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let taken = c1.reclaim_idle(10, true).await.unwrap();
    assert_eq!(taken.deliveries.len(), 1);
    assert_eq!(taken.deliveries[0].delivery_count, 2);
    assert!(!c1.exhausted(&taken.deliveries[0]));
}

#[tokio::test]
async fn a_blocked_claim_outlives_the_500_ms_default_and_wakes_on_enqueue() {
    let server = RedisServer::start();
    let cfg = QueueConfig {
        block: Duration::from_secs(3),
        ..config(&server, "a")
    };
    let q = queue_with(cfg).await;
    // Nothing comes: the full block passes without a response-timeout error.
    let started = Instant::now();
    assert!(
        q.claim(true, Duration::from_millis(1500))
            .await
            .unwrap()
            .is_none()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "returned early: {waited:?}"
    );

    let waiter = {
        let q = q.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            (q.claim_next(true).await, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let id = q.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    let (got, took) = waiter.await.unwrap();
    assert_eq!(got.unwrap().unwrap().id, id);
    assert!(took < Duration::from_millis(2000), "woke late: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run_is_survived() {
    let mut server = RedisServer::start();
    let q = queue(&server, "a").await;
    q.enqueue(&job("j1", Action::Retry, Some(0))).await.unwrap();
    let d = q.claim_next(true).await.unwrap().unwrap();
    let lease = q.start_lease(&d, None);

    server.stop();
    let err = q.claim_next(true).await.expect_err("redis is down");
    assert!(err.is_retryable(), "{err}");
    let err = q
        .enqueue(&job("j2", Action::Retry, Some(1)))
        .await
        .expect_err("down");
    assert!(err.is_retryable(), "{err}");
    assert!(q.off_hours_status().await.unwrap_err().is_retryable());

    server.restart();
    // The data is gone (no persistence): the API enqueues again, which recreates the stream
    // without the group; the worker's next claim recreates the group and still gets the entry.
    let until = Instant::now() + Duration::from_secs(20);
    let id = loop {
        match q.enqueue(&job("j2", Action::Retry, Some(1))).await {
            Ok(id) => break id,
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no reconnect: {e}"),
        }
    };
    // The stream came back without the group.
    let mut c = raw(&server).await;
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(INTERACTIVE)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(groups.is_empty(), "{groups:?}");
    let got = loop {
        match q.claim_next(true).await {
            Ok(Some(d)) => break d,
            Ok(None) => panic!("the entry enqueued after the restart was not claimed"),
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("claim after restart: {e}"),
        }
    };
    assert_eq!(got.id, id);
    // The old entry died with the data: its lease says so instead of pretending.
    let why = tokio::time::timeout(Duration::from_secs(5), lease.lost())
        .await
        .expect("the lease notices the lost entry");
    assert!(why.contains("NotPending"), "{why}");
    assert!(q.ack(&got).await.unwrap());
}

#[tokio::test]
async fn connecting_to_a_redis_that_is_down_fails_clearly_after_backoff() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = QueueConfig {
        redis_url: format!("redis://127.0.0.1:{port}/"),
        connect_patience: Duration::from_millis(1500),
        ..QueueConfig::default()
    };
    let started = Instant::now();
    let err = Queue::connect(cfg)
        .await
        .expect_err("nothing listens there");
    let took = started.elapsed();
    assert!(
        matches!(err, QueueError::Unavailable { attempts, .. } if attempts >= 3),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(matches!(
        Queue::connect(QueueConfig::new("not a url")).await,
        Err(QueueError::Config(_))
    ));
}

#[tokio::test]
async fn check_server_warns_about_eviction_and_missing_persistence() {
    let plain = RedisServer::start();
    let q = queue(&plain, "a").await;
    let w = q.check_server().await.unwrap();
    assert!(w.contains(&ServerWarning::NoPersistence), "{w:?}");
    assert!(
        !w.iter()
            .any(|w| matches!(w, ServerWarning::EvictingPolicy(_))),
        "{w:?}"
    );

    let lru =
        RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru", "--appendonly", "yes"]);
    let q = queue(&lru, "a").await;
    let w = q.check_server().await.unwrap();
    assert!(
        w.contains(&ServerWarning::EvictingPolicy("allkeys-lru".into())),
        "{w:?}"
    );
    assert!(!w.contains(&ServerWarning::NoPersistence), "{w:?}");
    assert!(w.iter().all(|w| !w.to_string().is_empty()));
}

#[tokio::test]
async fn progress_and_cancel_keys() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let q = queue(&server, "a").await;
    q.set_progress("j1", None, 1, 1, "pose").await.unwrap();
    q.set_progress("j1", Some(0), 3, 20, "denoise")
        .await
        .unwrap();
    q.set_progress("j1", Some(5), 20, 20, "upload")
        .await
        .unwrap();
    let p = q.get_progress("j1").await.unwrap();
    assert_eq!(p.set.as_ref().map(|s| s.stage.as_str()), Some("pose"));
    assert_eq!(p.emoji[&0].step, 3);
    assert_eq!(p.emoji[&0].total, 20);
    assert_eq!(p.emoji[&5].stage, "upload");
    assert!(p.updated_at.is_some());
    let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("popcon:progress:j1")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fields["0:step"], "3");
    assert!(pttl(&mut c, "popcon:progress:j1").await > 0);
    assert_eq!(q.get_progress("nope").await.unwrap(), Default::default());

    assert!(!q.is_cancelled("j1").await.unwrap());
    q.request_cancel("j1", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(q.is_cancelled("j1").await.unwrap());
    let ttl = pttl(&mut c, "popcon:cancel:j1").await;
    assert!(ttl > 0 && ttl <= 60_000);
    q.clear_cancel("j1").await.unwrap();
    assert!(!q.is_cancelled("j1").await.unwrap());
    assert!(q.set_progress("../x", Some(0), 1, 1, "x").await.is_err());
}

#[tokio::test]
async fn depth_and_trimming_never_touch_pending_or_unread_entries() {
    let server = RedisServer::start();
    let mut c = raw(&server).await;
    let q = queue(&server, "a").await;
    for i in 0..4 {
        q.enqueue(&job("j1", Action::Retry, Some(i))).await.unwrap();
    }
    let d1 = q.claim_next(true).await.unwrap().unwrap();
    let d2 = q.claim_next(true).await.unwrap().unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!(depth.interactive.length, 4);
    assert_eq!(depth.interactive.pending, 2);
    assert_eq!(depth.interactive.undelivered, Some(2));
    assert_eq!(depth.bulk.length, 0);
    // d1 still pending: nothing may go.
    q.ack(&d2).await.unwrap();
    assert_eq!(q.trim_acked().await.unwrap(), 0);
    q.ack(&d1).await.unwrap();
    // Both acked: they go, the two unread stay.
    assert_eq!(q.trim_acked().await.unwrap(), 2);
    assert_eq!(xlen(&mut c, INTERACTIVE).await, 2);
    let rest: Vec<_> = [q.claim_next(true).await, q.claim_next(true).await]
        .into_iter()
        .map(|d| d.unwrap().unwrap())
        .collect();
    for d in &rest {
        q.ack(d).await.unwrap();
    }
    assert_eq!(q.trim_acked().await.unwrap(), 2);
    assert_eq!(xlen(&mut c, INTERACTIVE).await, 0);
    assert!(q.claim_next(true).await.unwrap().is_none());
}
