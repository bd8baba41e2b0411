//! Conformance suite for the job store: every case in `conformance!` runs once against SQLite
//! (a real file in a temporary directory) and once against Postgres (a fresh database on the
//! local server, created for the test and dropped after it), so the two backends cannot drift
//! apart. A few cases at the end exercise one backend's specifics (SQLite's WAL and busy
//! retries) or need no database at all (the thumbnail chain, URL errors).
//!
//! Postgres: `POPCON_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! is a maintenance connection with the right to create databases. If the server is not
//! running, the Postgres cases fail with instructions; they never skip silently.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use popcon_worker::job::{Action, EmojiStatus, JobStatus, charge_key};
use popcon_worker::store::{
    BackendKind, Charge, EmojiOutcome, EmojiRecord, JobRecord, LedgerOutcome, NewJob,
    PreflipOutcome, RefundOutcome, StartOutcome, Store, StoreError, StoreOptions, Thumbnail,
    ThumbnailSource, WriteOutcome, thumbnail_source,
};
use sqlx::{Connection, Executor};

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// What a case gets: a connected, migrated store on a database of its own.
struct Ctx {
    store: Store,
    url: String,
    kind: Kind,
}

/// Resources to release after a case.
struct Env {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg_db: Option<String>,
}

fn pg_admin_url() -> String {
    std::env::var("POPCON_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG.to_string())
}

async fn pg_admin() -> sqlx::PgConnection {
    let url = pg_admin_url();
    match sqlx::PgConnection::connect(&url).await {
        Ok(c) => c,
        Err(e) => panic!(
            "\n\nPostgres is not reachable at {url}: {e}\n\
             The store's conformance suite runs every case against Postgres too; it does not skip.\n\
             Start the local server with:\n    \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
             or point POPCON_TEST_POSTGRES_URL at a server where the role may CREATE DATABASE.\n"
        ),
    }
}

/// `url` with its database (path) replaced by `db`, keeping host, user and query options.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

async fn setup(kind: Kind) -> Env {
    match kind {
        Kind::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("popcon.db").display());
            Env {
                url,
                _dir: Some(dir),
                pg_db: None,
            }
        }
        Kind::Postgres => {
            let mut admin = pg_admin().await;
            let db = format!("popcon_test_{}", uuid::Uuid::new_v4().simple());
            admin
                .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
                .await
                .unwrap_or_else(|e| panic!("CREATE DATABASE {db}: {e}"));
            let _ = admin.close().await;
            Env {
                url: with_database(&pg_admin_url(), &db),
                _dir: None,
                pg_db: Some(db),
            }
        }
    }
}

async fn teardown(env: Env) {
    if let Some(db) = env.pg_db {
        let mut admin = pg_admin().await;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
            )))
            .await
            .unwrap_or_else(|e| panic!("DROP DATABASE {db}: {e}"));
        let _ = admin.close().await;
    }
}

fn options(kind: Kind) -> StoreOptions {
    StoreOptions {
        // Tests run in parallel, each with its own pool: stay well under Postgres'
        // max_connections (100 by default).
        max_connections: match kind {
            Kind::Sqlite => 8,
            Kind::Postgres => 5,
        },
        ..StoreOptions::default()
    }
}

/// Runs one case on a fresh database of `kind`, and always drops that database, then
/// re-raises the case's panic if it had one.
async fn run<F, Fut>(kind: Kind, case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let env = setup(kind).await;
    let store = match Store::connect_with(&env.url, options(kind)).await {
        Ok(s) => s,
        Err(e) => {
            teardown(env).await;
            panic!("connecting the {kind:?} store: {e}");
        }
    };
    let expected = match kind {
        Kind::Sqlite => BackendKind::Sqlite,
        Kind::Postgres => BackendKind::Postgres,
    };
    assert_eq!(store.backend(), expected);
    let ctx = Ctx {
        store: store.clone(),
        url: env.url.clone(),
        kind,
    };
    let outcome = tokio::spawn(case(ctx)).await;
    store.close().await;
    teardown(env).await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("case did not finish: {e}"),
        }
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run(super::Kind::Sqlite, super::$case).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run(super::Kind::Postgres, super::$case).await;
                }
            )*
        }
    };
}

conformance!(
    create_and_get,
    start_is_fenced_and_counts_attempts,
    stale_fence_is_superseded_and_changes_nothing,
    emoji0_finish_writes_thumbnail_in_the_same_transaction,
    thumbnail_invariant_holds_under_concurrent_regenerate,
    job_settles_only_when_its_last_emoji_settles,
    concurrent_last_finishes_settle_the_job_once,
    preflip_has_exactly_one_winner_among_50,
    approve_is_fenced_and_approve_all_approves_each_once,
    fifty_concurrent_charges_never_overdraw,
    ledger_idempotency_and_refund_exactly_once,
    users_by_token_hash,
    charged_preflip_is_one_transaction_and_refunds_once,
    charged_job_creation_and_bump_done,
    list_jobs_newest_first_per_user,
    migrations_rerun_cleanly_and_refuse_a_changed_one,
    outbox_entries_commit_with_their_flip_and_track_publishing,
    submission_keys_map_a_repeat_to_the_first_job,
    an_animation_is_written_with_the_approval_under_the_fence_and_cleared_by_a_preflip,
    a_queued_approval_holds_its_row_until_its_entry_goes,
);

// ---- helpers -----------------------------------------------------------------------------

fn new_job(id: &str, user: &str, n: usize) -> NewJob {
    NewJob {
        id: id.to_string(),
        user_id: user.to_string(),
        subject: "a red fox".to_string(),
        style: Some("sticker".to_string()),
        seed: 42,
        model: Some("tiny".to_string()),
        reference_key: None,
        labels: (0..n).map(|i| format!("label-{i}")).collect(),
    }
}

fn image_key(job: &str, idx: u32, fence: u64) -> String {
    format!("img/{job}/{idx}/{fence}")
}

fn thumb_key(job: &str, fence: u64) -> String {
    format!("thumb/{job}/0/{fence}")
}

/// A result whose keys name the fence that produced them, so a reader can tell whether the
/// thumbnail belongs to the image the row shows.
fn result(job: &str, idx: u32, fence: u64) -> EmojiOutcome {
    EmojiOutcome {
        job_id: job.to_string(),
        idx,
        fence,
        image_key: image_key(job, idx, fence),
        seed: 1000 + u64::from(idx),
        thumbnail: (idx == 0).then(|| Thumbnail {
            path: format!("/thumbs/{job}/{fence}.webp"),
            key: thumb_key(job, fence),
        }),
    }
}

async fn job(store: &Store, id: &str) -> JobRecord {
    store
        .get_job(id)
        .await
        .expect("get_job")
        .expect("job exists")
}

async fn start(store: &Store, id: &str, idx: u32, fence: u64) {
    match store.start_emoji(id, idx, fence).await.expect("start") {
        StartOutcome::Started { .. } => {}
        other => panic!("start {id}/{idx}@{fence}: {other:?}"),
    }
}

async fn finish(store: &Store, id: &str, idx: u32, fence: u64) -> Option<JobStatus> {
    match store
        .finish_emoji(&result(id, idx, fence))
        .await
        .expect("finish")
    {
        WriteOutcome::Written { settled } => settled,
        other => panic!("finish {id}/{idx}@{fence}: {other:?}"),
    }
}

async fn fail(store: &Store, id: &str, idx: u32, fence: u64) -> Option<JobStatus> {
    match store
        .fail_emoji(id, idx, fence, "boom")
        .await
        .expect("fail")
    {
        WriteOutcome::Written { settled } => settled,
        other => panic!("fail {id}/{idx}@{fence}: {other:?}"),
    }
}

/// "emoji 0 done ⇒ thumbnail columns set", and set to the thumbnail of that very image.
fn check_thumbnail_invariant(job: &JobRecord) {
    let e0 = &job.emoji[0];
    if matches!(e0.status, EmojiStatus::Done | EmojiStatus::Approved) {
        let path = job.thumbnail_path.as_deref().unwrap_or("");
        let key = job.thumbnail_key.as_deref().unwrap_or("");
        assert!(
            !path.is_empty() && !key.is_empty(),
            "emoji 0 is {:?} but the thumbnail columns are empty: {job:?}",
            e0.status
        );
        assert_eq!(
            e0.image_key.as_deref(),
            Some(image_key(&job.id, 0, e0.fence).as_str())
        );
        assert_eq!(
            key,
            thumb_key(&job.id, e0.fence),
            "thumbnail is not emoji 0's image"
        );
    }
}

// ---- cases -------------------------------------------------------------------------------

async fn create_and_get(ctx: Ctx) {
    let s = &ctx.store;
    let mut spec = new_job("job-1", "u1", 3);
    spec.seed = u64::MAX; // every bit of a u64 seed survives the signed BIGINT column
    spec.reference_key = Some("refs/job-1.png".into());
    let created = s.create_job(&spec).await.unwrap();
    assert_eq!(created.status, JobStatus::Pending);
    assert_eq!(created.emoji.len(), 3);
    for (i, e) in created.emoji.iter().enumerate() {
        assert_eq!(e.idx as usize, i);
        assert_eq!(e.label, format!("label-{i}"));
        assert_eq!(e.status, EmojiStatus::Pending);
        assert_eq!((e.fence, e.attempts), (1, 0));
        assert_eq!(
            (e.image_key.clone(), e.seed, e.error.clone()),
            (None, None, None)
        );
    }
    let read = job(s, "job-1").await;
    assert_eq!(read, created, "a created job reads back identically");
    assert_eq!(read.seed, u64::MAX);
    assert_eq!(read.thumbnail_source(), ThumbnailSource::Placeholder);

    assert!(s.get_job("no-such-job").await.unwrap().is_none());

    let dup = s.create_job(&spec).await.unwrap_err();
    assert!(matches!(dup, StoreError::Conflict(_)), "{dup}");
    assert!(!dup.is_retryable());
    for n in [0, 65] {
        let err = s.create_job(&new_job("job-n", "u1", n)).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{n} labels: {err}");
    }
    assert!(s.get_job("job-n").await.unwrap().is_none());

    assert!(s.set_pose_key("job-1", "poses/job-1.png").await.unwrap());
    assert!(s.set_job_status("job-1", JobStatus::Running).await.unwrap());
    assert!(!s.set_pose_key("no-such-job", "k").await.unwrap());
    assert!(
        !s.set_job_status("no-such-job", JobStatus::Done)
            .await
            .unwrap()
    );
    let read = job(s, "job-1").await;
    assert_eq!(read.pose_key.as_deref(), Some("poses/job-1.png"));
    assert_eq!(read.status, JobStatus::Running);
    assert!(read.updated_at >= created.updated_at);

    assert_eq!(s.bump_attempts("job-1", 2).await.unwrap(), Some(1));
    assert_eq!(s.bump_attempts("job-1", 9).await.unwrap(), None);
    s.ping().await.unwrap();
}

async fn start_is_fenced_and_counts_attempts(ctx: Ctx) {
    let s = &ctx.store;
    s.create_job(&new_job("j", "u", 2)).await.unwrap();
    assert_eq!(
        s.start_emoji("j", 1, 1).await.unwrap(),
        StartOutcome::Started { attempts: 1 }
    );
    assert_eq!(
        job(s, "j").await.status,
        JobStatus::Running,
        "first start runs the job"
    );
    // The same message again (its worker died mid-run and the entry was reclaimed).
    assert_eq!(
        s.start_emoji("j", 1, 1).await.unwrap(),
        StartOutcome::Started { attempts: 2 }
    );
    finish(s, "j", 1, 1).await;
    assert_eq!(
        s.start_emoji("j", 1, 1).await.unwrap(),
        StartOutcome::WrongState(EmojiStatus::Done),
        "a duplicate after the result is written does no work"
    );
    assert_eq!(
        s.preflip_emoji("j", 1, &[EmojiStatus::Done, EmojiStatus::Failed])
            .await
            .unwrap(),
        PreflipOutcome::Flipped { fence: 2 }
    );
    assert_eq!(
        s.start_emoji("j", 1, 1).await.unwrap(),
        StartOutcome::Superseded { current_fence: 2 }
    );
    assert_eq!(
        s.start_emoji("j", 1, 2).await.unwrap(),
        StartOutcome::Started { attempts: 1 },
        "attempts count per fence"
    );
    assert_eq!(
        s.start_emoji("j", 7, 1).await.unwrap(),
        StartOutcome::Missing
    );
    assert_eq!(
        s.start_emoji("nope", 0, 1).await.unwrap(),
        StartOutcome::Missing
    );
    assert!(matches!(
        s.start_emoji("j", 0, 0).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
}

async fn stale_fence_is_superseded_and_changes_nothing(ctx: Ctx) {
    let s = &ctx.store;
    s.create_job(&new_job("j", "u", 2)).await.unwrap();
    start(s, "j", 0, 1).await;
    start(s, "j", 1, 1).await;
    finish(s, "j", 0, 1).await;
    finish(s, "j", 1, 1).await;
    for idx in [0, 1] {
        assert_eq!(
            s.preflip_emoji("j", idx, &[EmojiStatus::Done])
                .await
                .unwrap(),
            PreflipOutcome::Flipped { fence: 2 }
        );
    }
    let before = job(s, "j").await;

    // Every fenced write with the old fence is refused and writes nothing at all.
    for idx in [0, 1] {
        let mut stale = result("j", idx, 1);
        stale.image_key = "img/stale".into();
        assert_eq!(
            s.finish_emoji(&stale).await.unwrap(),
            WriteOutcome::Superseded { current_fence: 2 }
        );
        assert_eq!(
            s.fail_emoji("j", idx, 1, "stale").await.unwrap(),
            WriteOutcome::Superseded { current_fence: 2 }
        );
        assert_eq!(
            s.approve_emoji("j", idx, 1).await.unwrap(),
            WriteOutcome::Superseded { current_fence: 2 }
        );
    }
    assert_eq!(
        s.fail_unsettled("j", 1, "stale").await.unwrap(),
        Some(vec![])
    );
    assert_eq!(
        job(s, "j").await,
        before,
        "stale writes changed the database"
    );

    // The current fence writes, even from `pending`; writing it twice is refused.
    assert_eq!(finish(s, "j", 1, 2).await, None);
    assert_eq!(
        s.finish_emoji(&result("j", 1, 2)).await.unwrap(),
        WriteOutcome::WrongState(EmojiStatus::Done)
    );
    assert_eq!(
        s.finish_emoji(&result("nope", 1, 1)).await.unwrap(),
        WriteOutcome::Missing
    );
    assert_eq!(
        s.finish_emoji(&result("j", 5, 1)).await.unwrap(),
        WriteOutcome::Missing
    );
}

async fn emoji0_finish_writes_thumbnail_in_the_same_transaction(ctx: Ctx) {
    let s = &ctx.store;
    s.create_job(&new_job("j", "u", 2)).await.unwrap();
    start(s, "j", 0, 1).await;

    // Emoji 0 without its thumbnail is refused before anything is written.
    let mut bare = result("j", 0, 1);
    bare.thumbnail = None;
    assert!(matches!(
        s.finish_emoji(&bare).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
    let mut empty = result("j", 0, 1);
    empty.thumbnail = Some(Thumbnail {
        path: "/thumbs/x.webp".into(),
        key: " ".into(),
    });
    assert!(matches!(
        s.finish_emoji(&empty).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
    let j = job(s, "j").await;
    assert_eq!(j.emoji[0].status, EmojiStatus::Running);
    assert_eq!((j.thumbnail_path, j.thumbnail_key), (None, None));

    finish(s, "j", 0, 1).await;
    let j = job(s, "j").await;
    assert_eq!(j.emoji[0].status, EmojiStatus::Done);
    assert_eq!(j.emoji[0].seed, Some(1000));
    assert_eq!(j.thumbnail_path.as_deref(), Some("/thumbs/j/1.webp"));
    assert_eq!(j.thumbnail_key.as_deref(), Some(thumb_key("j", 1).as_str()));
    check_thumbnail_invariant(&j);
    assert_eq!(
        j.thumbnail_source(),
        ThumbnailSource::Path("/thumbs/j/1.webp".into())
    );

    // Another emoji's thumbnail never replaces the job's.
    start(s, "j", 1, 1).await;
    let mut other = result("j", 1, 1);
    other.thumbnail = Some(Thumbnail {
        path: "/thumbs/wrong.webp".into(),
        key: "thumb/wrong".into(),
    });
    assert!(matches!(
        s.finish_emoji(&other).await.unwrap(),
        WriteOutcome::Written { .. }
    ));
    assert_eq!(
        job(s, "j").await.thumbnail_key.as_deref(),
        Some(thumb_key("j", 1).as_str())
    );

    // A regenerate of emoji 0 keeps the previous thumbnail until the new image lands with
    // its own.
    s.preflip_emoji("j", 0, &[EmojiStatus::Done]).await.unwrap();
    let j = job(s, "j").await;
    assert_eq!(j.emoji[0].status, EmojiStatus::Pending);
    assert_eq!(j.thumbnail_key.as_deref(), Some(thumb_key("j", 1).as_str()));
    start(s, "j", 0, 2).await;
    finish(s, "j", 0, 2).await;
    check_thumbnail_invariant(&job(s, "j").await);
}

/// The seed's archive incident, as a race: regenerates of emoji 0 keep flipping it back to
/// `pending` and rewriting it, stale workers replay old fences, and readers poll the whole
/// time. No reader may ever see emoji 0 done without the thumbnail of that very image.
async fn thumbnail_invariant_holds_under_concurrent_regenerate(ctx: Ctx) {
    const REGENERATIONS: usize = 24;
    let s = ctx.store.clone();
    s.create_job(&new_job("t", "u", 2)).await.unwrap();
    start(&s, "t", 0, 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let observations = Arc::new(AtomicUsize::new(0));
    let mut observers = Vec::new();
    for _ in 0..3 {
        let (s, stop, seen) = (s.clone(), stop.clone(), observations.clone());
        observers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                check_thumbnail_invariant(&job(&s, "t").await);
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let wins = Arc::new(AtomicUsize::new(0));
    let mut regenerators = Vec::new();
    for r in 0..8usize {
        let (s, wins) = (s.clone(), wins.clone());
        regenerators.push(tokio::spawn(async move {
            let mut round = 0usize;
            while wins.load(Ordering::SeqCst) < REGENERATIONS {
                round += 1;
                let flipped = s
                    .preflip_emoji("t", 0, &[EmojiStatus::Done, EmojiStatus::Failed])
                    .await
                    .unwrap();
                match flipped {
                    PreflipOutcome::Flipped { fence } => {
                        wins.fetch_add(1, Ordering::SeqCst);
                        // Nobody else can flip a pending/running row, so this worker owns it.
                        start(&s, "t", 0, fence).await;
                        tokio::task::yield_now().await;
                        if (r + round) % 4 == 0 {
                            fail(&s, "t", 0, fence).await;
                        } else {
                            finish(&s, "t", 0, fence).await;
                        }
                    }
                    PreflipOutcome::WrongState(_) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    PreflipOutcome::Missing => panic!("job vanished"),
                    PreflipOutcome::InFlight => panic!("no approval was queued"),
                }
            }
        }));
    }

    // Stale workers: replay every fence older than the current one; always superseded.
    let stale_stop = Arc::new(AtomicBool::new(false));
    let stale = {
        let (s, stop) = (s.clone(), stale_stop.clone());
        tokio::spawn(async move {
            let mut refused = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let current = job(&s, "t").await.emoji[0].fence;
                for f in 1..current {
                    match s.finish_emoji(&result("t", 0, f)).await.unwrap() {
                        WriteOutcome::Superseded { current_fence } => {
                            assert!(current_fence > f);
                            refused += 1;
                        }
                        other => panic!("stale fence {f} (current {current}) wrote: {other:?}"),
                    }
                }
                tokio::task::yield_now().await;
            }
            refused
        })
    };

    // The original worker finishes fence 1 while the regenerators hammer the row.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(finish(&s, "t", 0, 1).await, None);

    for r in regenerators {
        r.await.unwrap();
    }
    stale_stop.store(true, Ordering::Relaxed);
    let refused = stale.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for o in observers {
        o.await.unwrap();
    }

    let end = job(&s, "t").await;
    check_thumbnail_invariant(&end);
    let wins = wins.load(Ordering::SeqCst) as u64;
    assert_eq!(
        end.emoji[0].fence,
        1 + wins,
        "every win bumped the fence exactly once"
    );
    assert!(wins >= REGENERATIONS as u64);
    assert!(observations.load(Ordering::Relaxed) > 0);
    assert!(refused > 0, "the stale writer never ran");
}

async fn job_settles_only_when_its_last_emoji_settles(ctx: Ctx) {
    let s = &ctx.store;
    // done + failed → partial, and only at the last one
    s.create_job(&new_job("a", "u", 3)).await.unwrap();
    for i in 0..3 {
        start(s, "a", i, 1).await;
    }
    assert_eq!(finish(s, "a", 0, 1).await, None);
    assert_eq!(job(s, "a").await.status, JobStatus::Running);
    assert_eq!(fail(s, "a", 1, 1).await, None);
    assert_eq!(job(s, "a").await.status, JobStatus::Running);
    assert_eq!(finish(s, "a", 2, 1).await, Some(JobStatus::Partial));
    let a = job(s, "a").await;
    assert_eq!(a.status, JobStatus::Partial);
    assert_eq!(a.emoji[1].error.as_deref(), Some("boom"));

    // A retry re-opens the job; its success settles it done.
    assert_eq!(
        s.preflip_emoji("a", 1, &[EmojiStatus::Failed])
            .await
            .unwrap(),
        PreflipOutcome::Flipped { fence: 2 }
    );
    let a = job(s, "a").await;
    assert_eq!(a.status, JobStatus::Pending);
    assert_eq!((a.emoji[1].error.clone(), a.emoji[1].attempts), (None, 0));
    start(s, "a", 1, 2).await;
    assert_eq!(job(s, "a").await.status, JobStatus::Running);
    assert_eq!(finish(s, "a", 1, 2).await, Some(JobStatus::Done));

    // all done → done
    s.create_job(&new_job("b", "u", 2)).await.unwrap();
    start(s, "b", 0, 1).await;
    assert_eq!(finish(s, "b", 0, 1).await, None);
    start(s, "b", 1, 1).await;
    assert_eq!(finish(s, "b", 1, 1).await, Some(JobStatus::Done));
    assert_eq!(job(s, "b").await.status, JobStatus::Done);

    // all failed → failed
    s.create_job(&new_job("c", "u", 2)).await.unwrap();
    start(s, "c", 0, 1).await;
    start(s, "c", 1, 1).await;
    assert_eq!(fail(s, "c", 0, 1).await, None);
    assert_eq!(fail(s, "c", 1, 1).await, Some(JobStatus::Failed));
    assert_eq!(job(s, "c").await.status, JobStatus::Failed);

    // a dead-lettered set fails what is left of it, at once
    s.create_job(&new_job("d", "u", 3)).await.unwrap();
    start(s, "d", 0, 1).await;
    finish(s, "d", 0, 1).await;
    start(s, "d", 1, 1).await;
    assert_eq!(
        s.fail_unsettled("d", 1, "dead-lettered").await.unwrap(),
        Some(vec![1, 2])
    );
    let d = job(s, "d").await;
    assert_eq!(d.status, JobStatus::Partial);
    assert_eq!(d.emoji[2].error.as_deref(), Some("dead-lettered"));
    assert_eq!(
        s.fail_unsettled("d", 1, "again").await.unwrap(),
        Some(vec![])
    );
    assert_eq!(s.fail_unsettled("nope", 1, "x").await.unwrap(), None);
}

/// The write-skew trap: each of the last emoji, finishing at the same moment, must not decide
/// from a view that misses the others. Exactly one write sees the job settle.
async fn concurrent_last_finishes_settle_the_job_once(ctx: Ctx) {
    const N: u32 = 16;
    let s = ctx.store.clone();
    s.create_job(&new_job("j", "u", N as usize)).await.unwrap();
    for i in 0..N {
        start(&s, "j", i, 1).await;
    }
    let mut tasks = Vec::new();
    for i in 0..N {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { finish(&s, "j", i, 1).await }));
    }
    let mut settled = Vec::new();
    for t in tasks {
        settled.extend(t.await.unwrap());
    }
    assert_eq!(
        settled,
        vec![JobStatus::Done],
        "exactly one finish settles the job"
    );
    assert_eq!(job(&s, "j").await.status, JobStatus::Done);
}

async fn preflip_has_exactly_one_winner_among_50(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_job(&new_job("j", "u", 1)).await.unwrap();
    start(&s, "j", 0, 1).await;
    fail(&s, "j", 0, 1).await;
    assert_eq!(job(&s, "j").await.status, JobStatus::Failed);

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.preflip_emoji("j", 0, &[EmojiStatus::Failed])
                .await
                .unwrap()
        }));
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    for t in tasks {
        match t.await.unwrap() {
            PreflipOutcome::Flipped { fence } => winners.push(fence),
            PreflipOutcome::WrongState(EmojiStatus::Pending) => losers += 1,
            other => panic!("unexpected preflip outcome {other:?}"),
        }
    }
    assert_eq!(winners, vec![2], "exactly one caller gets the new fence");
    assert_eq!(losers, 49);
    let j = job(&s, "j").await;
    assert_eq!(j.emoji[0].status, EmojiStatus::Pending);
    assert_eq!(j.emoji[0].fence, 2);
    assert_eq!(j.emoji[0].error, None);
    assert_eq!(j.status, JobStatus::Pending);

    assert_eq!(
        s.preflip_emoji("j", 3, &[EmojiStatus::Failed])
            .await
            .unwrap(),
        PreflipOutcome::Missing
    );
    assert_eq!(
        s.preflip_emoji("nope", 0, &[EmojiStatus::Failed])
            .await
            .unwrap(),
        PreflipOutcome::Missing
    );
    assert!(matches!(
        s.preflip_emoji("j", 0, &[]).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
}

async fn an_animation_is_written_with_the_approval_under_the_fence_and_cleared_by_a_preflip(
    ctx: Ctx,
) {
    let s = ctx.store.clone();
    s.create_job(&new_job("j", "u", 2)).await.unwrap();
    for i in 0..2 {
        start(&s, "j", i, 1).await;
        finish(&s, "j", i, 1).await;
    }
    assert_eq!(
        s.bump_fence("j", 0, &[EmojiStatus::Done]).await.unwrap(),
        PreflipOutcome::Flipped { fence: 2 }
    );
    // A stale animator (fence 1) attaches nothing.
    assert_eq!(
        s.approve_emoji_animated("j", 0, 1, "anim/old.webp")
            .await
            .unwrap(),
        WriteOutcome::Superseded { current_fence: 2 }
    );
    let row = &job(&s, "j").await.emoji[0];
    assert_eq!(
        (row.status, row.animation_key.as_deref()),
        (EmojiStatus::Done, None)
    );
    // The current one writes the status and the key in one statement.
    assert!(matches!(
        s.approve_emoji_animated("j", 0, 2, "anim/j-0-2.webp")
            .await
            .unwrap(),
        WriteOutcome::Written { .. }
    ));
    let row = &job(&s, "j").await.emoji[0];
    assert_eq!(row.status, EmojiStatus::Approved);
    assert_eq!(row.animation_key.as_deref(), Some("anim/j-0-2.webp"));
    // A plain approve of the other row leaves its key empty.
    s.bump_fence("j", 1, &[EmojiStatus::Done]).await.unwrap();
    s.approve_emoji("j", 1, 2).await.unwrap();
    assert_eq!(job(&s, "j").await.emoji[1].animation_key, None);
    // Work queued on the row again (a regenerate's pre-flip) drops the old animation.
    assert_eq!(
        s.preflip_emoji("j", 0, &[EmojiStatus::Approved])
            .await
            .unwrap(),
        PreflipOutcome::Flipped { fence: 3 }
    );
    let row = &job(&s, "j").await.emoji[0];
    assert_eq!(
        (row.status, row.animation_key.as_deref()),
        (EmojiStatus::Pending, None)
    );
}

async fn approve_is_fenced_and_approve_all_approves_each_once(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_job(&new_job("j", "u", 4)).await.unwrap();
    for i in 0..4 {
        start(&s, "j", i, 1).await;
    }
    for i in 0..3 {
        finish(&s, "j", i, 1).await;
    }
    fail(&s, "j", 3, 1).await;

    // The approve pre-step moves only the fence: the row stays done for the worker.
    assert_eq!(
        s.bump_fence("j", 0, &[EmojiStatus::Done]).await.unwrap(),
        PreflipOutcome::Flipped { fence: 2 }
    );
    assert_eq!(job(&s, "j").await.emoji[0].status, EmojiStatus::Done);
    assert_eq!(
        s.approve_emoji("j", 0, 1).await.unwrap(),
        WriteOutcome::Superseded { current_fence: 2 }
    );
    assert_eq!(
        s.approve_emoji("j", 0, 2).await.unwrap(),
        WriteOutcome::Written {
            settled: Some(JobStatus::Partial)
        }
    );
    assert_eq!(
        s.approve_emoji("j", 0, 2).await.unwrap(),
        WriteOutcome::WrongState(EmojiStatus::Approved)
    );
    assert_eq!(
        s.approve_emoji("j", 3, 1).await.unwrap(),
        WriteOutcome::WrongState(EmojiStatus::Failed)
    );
    assert_eq!(
        s.bump_fence("j", 3, &[EmojiStatus::Done]).await.unwrap(),
        PreflipOutcome::WrongState(EmojiStatus::Failed)
    );

    // Two approve-alls at once: every done emoji approved by exactly one of them.
    let (a, b) = tokio::join!(s.approve_all("j"), s.approve_all("j"));
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    let union: BTreeSet<u32> = a.iter().chain(&b).copied().collect();
    assert_eq!(union, BTreeSet::from([1, 2]));
    assert_eq!(
        a.len() + b.len(),
        2,
        "an emoji was approved twice: {a:?} {b:?}"
    );
    assert_eq!(s.approve_all("j").await.unwrap(), Some(vec![]));
    assert_eq!(s.approve_all("nope").await.unwrap(), None);
    let j = job(&s, "j").await;
    let statuses: Vec<EmojiStatus> = j.emoji.iter().map(|e| e.status).collect();
    assert_eq!(
        statuses,
        [
            EmojiStatus::Approved,
            EmojiStatus::Approved,
            EmojiStatus::Approved,
            EmojiStatus::Failed
        ]
    );
    assert_eq!(j.status, JobStatus::Partial);
}

async fn fifty_concurrent_charges_never_overdraw(ctx: Ctx) {
    const N: i64 = 20;
    let s = ctx.store.clone();
    s.create_user("u", "hash-u", false).await.unwrap();
    assert_eq!(
        s.grant("u", N, "top-up", "grant-1").await.unwrap(),
        LedgerOutcome::Applied { balance: N }
    );
    let mut tasks = Vec::new();
    for i in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.charge("u", 1, "retry", &format!("charge-{i}")).await
        }));
    }
    let (mut charged, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(LedgerOutcome::Applied { balance }) => {
                assert!(balance >= 0);
                charged += 1;
            }
            Err(StoreError::InsufficientCredits { balance, needed }) => {
                assert_eq!((balance, needed), (0, 1));
                refused += 1;
            }
            other => panic!("unexpected charge result {other:?}"),
        }
    }
    assert_eq!((charged, refused), (N, 50 - N));
    assert_eq!(s.balance("u").await.unwrap(), 0);
}

async fn ledger_idempotency_and_refund_exactly_once(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_user("u", "hash-u", false).await.unwrap();
    s.create_user("v", "hash-v", false).await.unwrap();
    assert_eq!(s.balance("u").await.unwrap(), 0);

    assert_eq!(
        s.grant("u", 10, "sign-up", "g1").await.unwrap(),
        LedgerOutcome::Applied { balance: 10 }
    );
    assert_eq!(
        s.grant("u", 10, "sign-up", "g1").await.unwrap(),
        LedgerOutcome::AlreadyApplied { balance: 10 }
    );
    assert_eq!(
        s.charge("u", 3, "retry j/1", "c1").await.unwrap(),
        LedgerOutcome::Applied { balance: 7 }
    );
    assert_eq!(
        s.charge("u", 3, "retry j/1", "c1").await.unwrap(),
        LedgerOutcome::AlreadyApplied { balance: 7 }
    );

    // The compensating refund, raced by several rollback paths: applied exactly once.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.refund("u", 3, "dispatch failed", "refund:c1")
                .await
                .unwrap()
        }));
    }
    let mut applied = 0;
    for t in tasks {
        match t.await.unwrap() {
            LedgerOutcome::Applied { balance } => {
                assert_eq!(balance, 10);
                applied += 1;
            }
            LedgerOutcome::AlreadyApplied { balance } => assert_eq!(balance, 10),
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(s.balance("u").await.unwrap(), 10);

    // The same charge key, double-clicked: one charge.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.charge("u", 1, "approve", "same-click").await.unwrap()
        }));
    }
    let mut applied = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), LedgerOutcome::Applied { .. }) {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(s.balance("u").await.unwrap(), 9);

    let err = s.charge("u", 100, "set", "big").await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InsufficientCredits {
                balance: 9,
                needed: 100
            }
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(
        s.balance("u").await.unwrap(),
        9,
        "a refused charge writes nothing"
    );
    // The refused key was not consumed: the same click can succeed once topped up.
    s.grant("u", 200, "top-up", "g2").await.unwrap();
    assert!(matches!(
        s.charge("u", 100, "set", "big").await.unwrap(),
        LedgerOutcome::Applied { balance: 109 }
    ));

    for (user, amount, key) in [("u", 4, "c1"), ("v", 3, "c1")] {
        let err = s.charge(user, amount, "x", key).await.unwrap_err();
        assert!(matches!(err, StoreError::IdemKeyReused { .. }), "{err}");
    }
    assert!(matches!(
        s.charge("ghost", 1, "x", "k-ghost").await.unwrap_err(),
        StoreError::UnknownUser(_)
    ));
    for amount in [0, -5] {
        assert!(matches!(
            s.charge("u", amount, "x", "k-bad").await.unwrap_err(),
            StoreError::Invalid(_)
        ));
        assert!(matches!(
            s.refund("u", amount, "x", "k-bad").await.unwrap_err(),
            StoreError::Invalid(_)
        ));
    }
    assert_eq!(s.balance("ghost").await.unwrap(), 0);
    assert_eq!(s.balance("v").await.unwrap(), 0);
}

fn charge<'a>(user: &'a str, amount: i64) -> Charge<'a> {
    Charge {
        user_id: user,
        amount,
        reason: "test",
    }
}

async fn charged_preflip_is_one_transaction_and_refunds_once(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_user("u", "hash-u", false).await.unwrap();
    s.grant("u", 3, "sign-up", "g").await.unwrap();
    s.create_job(&new_job("j", "u", 2)).await.unwrap();
    start(&s, "j", 0, 1).await;
    fail(&s, "j", 0, 1).await;
    let failed = [EmojiStatus::Failed];

    // 50 concurrent charged flips of one failed row: one flip, one charge.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.preflip_charged("j", 0, &failed, false, Action::Retry, charge("u", 1))
                .await
                .unwrap()
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (PreflipOutcome::Flipped { fence }, Some(c)) => won.push((fence, c)),
            (PreflipOutcome::WrongState(EmojiStatus::Pending), None) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(won.len(), 1);
    let (fence, charged) = won.remove(0);
    assert_eq!(fence, 2);
    assert_eq!(charged.key, charge_key("j", Action::Retry, Some(0), 2));
    assert_eq!((charged.amount, charged.balance), (1, 2));
    assert_eq!(s.balance("u").await.unwrap(), 2);

    // The dispatch failed: revert (only from exactly the flipped state), refund once.
    assert!(
        !s.revert_preflip(
            "j",
            0,
            1,
            EmojiStatus::Pending,
            EmojiStatus::Failed,
            Some("e")
        )
        .await
        .unwrap(),
        "an older fence does not revert"
    );
    assert!(
        s.revert_preflip(
            "j",
            0,
            2,
            EmojiStatus::Pending,
            EmojiStatus::Failed,
            Some("boom")
        )
        .await
        .unwrap()
    );
    let row = job(&s, "j").await.emoji[0].clone();
    assert_eq!(row.status, EmojiStatus::Failed);
    assert_eq!(row.error.as_deref(), Some("boom"));
    assert_eq!(
        row.fence, 3,
        "a reverted flip moves the fence on, so a late entry is stale"
    );
    assert!(
        !s.revert_preflip("j", 0, 2, EmojiStatus::Pending, EmojiStatus::Failed, None)
            .await
            .unwrap()
    );
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (s, key) = (s.clone(), charged.key.clone());
        tasks.push(tokio::spawn(async move {
            s.refund_charge(&key, "dispatch failed").await.unwrap()
        }));
    }
    let mut refunded = 0;
    for t in tasks {
        match t.await.unwrap() {
            RefundOutcome::Refunded {
                user_id,
                amount,
                balance,
            } => {
                assert_eq!((user_id.as_str(), amount, balance), ("u", 1, 3));
                refunded += 1;
            }
            RefundOutcome::AlreadyRefunded => {}
            RefundOutcome::NoCharge => panic!("the charge exists"),
        }
    }
    assert_eq!(refunded, 1);
    assert_eq!(s.balance("u").await.unwrap(), 3);
    assert_eq!(
        s.refund_charge("charge:none", "x").await.unwrap(),
        RefundOutcome::NoCharge
    );
    assert!(
        s.refund_charge("g", "x").await.is_err(),
        "a grant is not a charge"
    );

    // A refused charge leaves the row as it was.
    let err = s
        .preflip_charged("j", 0, &failed, false, Action::Retry, charge("u", 50))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InsufficientCredits {
                balance: 3,
                needed: 50
            }
        ),
        "{err}"
    );
    let row = job(&s, "j").await.emoji[0].clone();
    assert_eq!((row.status, row.fence), (EmojiStatus::Failed, 3));
    // Wrong state: neither flip nor charge.
    assert_eq!(
        s.preflip_charged("j", 1, &failed, false, Action::Retry, charge("u", 1))
            .await
            .unwrap(),
        (PreflipOutcome::WrongState(EmojiStatus::Pending), None)
    );
    assert_eq!(s.balance("u").await.unwrap(), 3);
}

async fn charged_job_creation_and_bump_done(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_user("u", "hash-u", false).await.unwrap();
    s.grant("u", 5, "sign-up", "g").await.unwrap();
    let (rec, charged) = s
        .create_job_charged(&new_job("a", "u", 3), charge("u", 3))
        .await
        .unwrap();
    assert_eq!(rec.emoji.len(), 3);
    assert_eq!(charged.key, charge_key("a", Action::GenerateSet, None, 1));
    assert_eq!(charged.balance, 2);
    // Too few credits: no job, no rows, no entry.
    let err = s
        .create_job_charged(&new_job("b", "u", 3), charge("u", 3))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::InsufficientCredits { .. }),
        "{err}"
    );
    assert!(s.get_job("b").await.unwrap().is_none());
    assert!(matches!(
        s.create_job_charged(&new_job("c", "ghost", 1), charge("ghost", 1))
            .await
            .unwrap_err(),
        StoreError::UnknownUser(_)
    ));
    assert!(s.get_job("c").await.unwrap().is_none());
    assert_eq!(s.balance("u").await.unwrap(), 2);

    // approve-all's pre-flip: only done rows move, each charged once under its new fence.
    for idx in [0, 2] {
        start(&s, "a", idx, 1).await;
        finish(&s, "a", idx, 1).await;
    }
    let (bumped, charges) = s
        .bump_done("a", Some(charge("u", 1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bumped, vec![(0, 2), (2, 2)]);
    assert_eq!(
        charges.iter().map(|c| c.key.clone()).collect::<Vec<_>>(),
        vec![
            charge_key("a", Action::ApproveAll, Some(0), 2),
            charge_key("a", Action::ApproveAll, Some(2), 2)
        ]
    );
    assert_eq!(s.balance("u").await.unwrap(), 0);
    let j = job(&s, "a").await;
    assert_eq!(j.emoji[0].status, EmojiStatus::Done, "the status is kept");
    // Not enough for another round: nothing bumped.
    assert!(matches!(
        s.bump_done("a", Some(charge("u", 1))).await.unwrap_err(),
        StoreError::InsufficientCredits { .. }
    ));
    assert_eq!(job(&s, "a").await.emoji[0].fence, 2);
    assert_eq!(s.bump_done("zzz", None).await.unwrap(), None);
}

async fn users_by_token_hash(ctx: Ctx) {
    let s = &ctx.store;
    let alice = s.create_user("alice", "h-alice", false).await.unwrap();
    let root = s.create_user("root", "h-root", true).await.unwrap();
    assert_eq!(
        s.user_by_token_hash("h-alice").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        s.user_by_token_hash("h-root").await.unwrap(),
        Some(root.clone())
    );
    assert!(root.is_admin && !alice.is_admin);
    assert_eq!(s.user_by_token_hash("h-nobody").await.unwrap(), None);
    assert_eq!(s.get_user("alice").await.unwrap(), Some(alice));
    assert_eq!(s.get_user("nobody").await.unwrap(), None);
    for (id, hash) in [("alice", "h-other"), ("bob", "h-alice")] {
        let err = s.create_user(id, hash, false).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        assert!(!err.is_retryable());
    }
    assert!(matches!(
        s.create_user("", "h", false).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
}

async fn list_jobs_newest_first_per_user(ctx: Ctx) {
    let s = &ctx.store;
    for i in 0..5 {
        s.create_job(&new_job(&format!("u1-{i}"), "u1", 2))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for i in 0..2 {
        s.create_job(&new_job(&format!("u2-{i}"), "u2", 1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ids = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let page = s.list_jobs(Some("u1"), 2, 0).await.unwrap();
    assert!(
        page.iter()
            .all(|j| j.emoji.len() == 2 && j.emoji[0].idx == 0)
    );
    assert_eq!(ids(page), ["u1-4", "u1-3"]);
    assert_eq!(
        ids(s.list_jobs(Some("u1"), 2, 2).await.unwrap()),
        ["u1-2", "u1-1"]
    );
    assert_eq!(ids(s.list_jobs(Some("u1"), 10, 4).await.unwrap()), ["u1-0"]);
    assert_eq!(
        ids(s.list_jobs(Some("u2"), 10, 0).await.unwrap()),
        ["u2-1", "u2-0"]
    );
    assert!(s.list_jobs(Some("nobody"), 10, 0).await.unwrap().is_empty());
    let all = s.list_jobs(None, 100, 0).await.unwrap();
    assert_eq!(all.len(), 7);
    assert_eq!(all[0].id, "u2-1");
    assert_eq!(
        all[0],
        job(s, "u2-1").await,
        "listed jobs carry the same data as get_job"
    );
}

async fn migrations_rerun_cleanly_and_refuse_a_changed_one(ctx: Ctx) {
    // A second process (or a restart) on the same database: nothing to do, no error.
    let again = Store::connect_with(&ctx.url, options(ctx.kind))
        .await
        .unwrap();
    again.close().await;

    // Someone edited an applied migration: refuse to run on a schema we can't vouch for.
    let tamper = "UPDATE _sqlx_migrations SET checksum = description";
    match ctx.kind {
        Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&ctx.url).await.unwrap();
            c.execute(tamper).await.unwrap();
            c.close().await.unwrap();
        }
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&ctx.url).await.unwrap();
            c.execute("UPDATE _sqlx_migrations SET checksum = convert_to(description, 'UTF8')")
                .await
                .unwrap();
            c.close().await.unwrap();
        }
    }
    let err = Store::connect_with(&ctx.url, options(ctx.kind))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Migration(_)), "{err}");
    assert!(!err.is_retryable());
}

// ---- backend-specific and database-free cases ----------------------------------------------

#[tokio::test]
async fn sqlite_creates_its_directory_and_runs_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/data/popcon.db");
    let store = Store::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert!(path.exists());
    store.create_job(&new_job("j", "u", 1)).await.unwrap();
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    c.close().await.unwrap();
    store.close().await;

    // A bare path works too (the lead's default config may hold one).
    let bare = dir.path().join("bare.db");
    let store = Store::connect(bare.to_str().unwrap()).await.unwrap();
    assert_eq!(store.backend(), BackendKind::Sqlite);
    store.close().await;
    assert!(bare.exists());
}

#[tokio::test]
async fn sqlite_in_memory_works_for_quick_tests() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    store.create_job(&new_job("j", "u", 2)).await.unwrap();
    assert_eq!(job(&store, "j").await.emoji.len(), 2);
}

/// Another process holds SQLite's write lock: the store waits and retries whole transactions,
/// succeeds once the lock is released, and reports a retryable `Busy` if it never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_busy_is_retried_then_reported_as_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("busy.db").display());
    let patient = Store::connect_with(
        &url,
        StoreOptions {
            busy_timeout: Duration::from_millis(20),
            busy_retries: 10,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    patient.create_job(&new_job("j", "u", 1)).await.unwrap();

    let mut locker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    locker.execute("BEGIN IMMEDIATE").await.unwrap();
    let writer = {
        let s = patient.clone();
        tokio::spawn(async move { s.start_emoji("j", 0, 1).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "the write should be waiting for the lock"
    );
    locker.execute("COMMIT").await.unwrap();
    assert_eq!(
        writer.await.unwrap().unwrap(),
        StartOutcome::Started { attempts: 1 }
    );

    let impatient = Store::connect_with(
        &url,
        StoreOptions {
            busy_timeout: Duration::from_millis(10),
            busy_retries: 2,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    locker.execute("BEGIN IMMEDIATE").await.unwrap();
    let err = impatient.start_emoji("j", 0, 1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Busy { attempts: 3, .. }),
        "expected Busy after 3 attempts, got {err}"
    );
    assert!(err.is_retryable());
    locker.execute("ROLLBACK").await.unwrap();
    // Reads never wait for the writer in WAL mode, and nothing half-written is visible.
    assert_eq!(job(&impatient, "j").await.emoji[0].attempts, 1);
    locker.close().await.unwrap();
    patient.close().await;
    impatient.close().await;
}

#[tokio::test]
async fn unreachable_database_is_retryable_and_bad_url_is_not() {
    let err = Store::connect_with(
        "postgres://postgres@127.0.0.1:1/popcon",
        StoreOptions {
            acquire_timeout: Duration::from_secs(2),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.is_retryable(),
        "unreachable server should be retryable: {err}"
    );

    let err = Store::connect("mysql://root:hunter2@localhost/db")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BadUrl { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(
        !err.to_string().contains("hunter2"),
        "passwords stay out of errors: {err}"
    );

    let err = Store::connect("postgres://u@h:notaport/db")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BadUrl { .. }), "{err}");
}

fn record(path: Option<&str>, key: Option<&str>) -> JobRecord {
    let t = chrono::Utc::now();
    JobRecord {
        id: "j".into(),
        user_id: "u".into(),
        status: JobStatus::Done,
        subject: "s".into(),
        style: None,
        seed: 1,
        model: None,
        reference_key: None,
        pose_key: None,
        thumbnail_path: path.map(Into::into),
        thumbnail_key: key.map(Into::into),
        created_at: t,
        updated_at: t,
        emoji: Vec::new(),
    }
}

fn emoji(idx: u32, image_key: Option<&str>) -> EmojiRecord {
    EmojiRecord {
        job_id: "j".into(),
        idx,
        label: "l".into(),
        status: EmojiStatus::Done,
        fence: 1,
        image_key: image_key.map(Into::into),
        seed: Some(1),
        attempts: 1,
        error: None,
        animation_key: None,
        updated_at: chrono::Utc::now(),
    }
}

#[test]
fn thumbnail_chain_every_branch() {
    use ThumbnailSource::*;
    let e0 = emoji(0, Some("img/0"));
    let e0_none = emoji(0, None);
    let e0_empty = emoji(0, Some(""));
    let e3 = emoji(3, Some("img/3"));
    let cases = [
        // path wins over everything
        (
            record(Some("/t.webp"), Some("thumb/k")),
            Some(&e0),
            Path("/t.webp".into()),
        ),
        // then the key
        (
            record(None, Some("thumb/k")),
            Some(&e0),
            Key("thumb/k".into()),
        ),
        (
            record(Some(""), Some("thumb/k")),
            Some(&e0),
            Key("thumb/k".into()),
        ),
        // the cache is empty (the seed's incident): emoji 0's own image
        (record(None, None), Some(&e0), Emoji0Image("img/0".into())),
        (
            record(Some(" "), Some("")),
            Some(&e0),
            Emoji0Image("img/0".into()),
        ),
        // nothing at all: the placeholder, never a dead URL
        (record(None, None), None, Placeholder),
        (record(None, None), Some(&e0_none), Placeholder),
        (record(None, None), Some(&e0_empty), Placeholder),
        // another emoji's image is not the thumbnail
        (record(None, None), Some(&e3), Placeholder),
    ];
    for (job, e, want) in cases {
        assert_eq!(thumbnail_source(&job, e), want, "{job:?} / {e:?}");
    }
    // The record's own emoji rows are used when loaded.
    let mut job = record(None, None);
    job.emoji = vec![emoji(0, Some("img/0")), emoji(1, Some("img/1"))];
    assert_eq!(job.thumbnail_source(), Emoji0Image("img/0".into()));
}

/// The outbox entry is written in the transaction of the job or pre-flip it dispatches, is
/// found by the relay while unpublished, by the reconciler once its last publish is old, and
/// can be withdrawn only while unpublished.
async fn outbox_entries_commit_with_their_flip_and_track_publishing(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_user("u", "hash-u", false).await.unwrap();
    s.grant("u", 10, "sign-up", "g").await.unwrap();
    let (rec, charged, entry) = s
        .create_job_dispatching(&new_job("a", "u", 2), Some(charge("u", 2)), None)
        .await
        .unwrap();
    assert_eq!(rec.emoji.len(), 2);
    assert_eq!(charged.unwrap().balance, 8);
    assert_eq!(entry.id, "a:generate_set:-:1");
    assert_eq!(entry.targets, vec![(0, 1), (1, 1)]);
    assert!(entry.unsettled_in(&rec));
    let future = chrono::Utc::now() + chrono::Duration::seconds(60);
    let past = chrono::Utc::now() - chrono::Duration::seconds(60);
    // Unpublished: due for the relay once old enough, not before.
    let due = s.outbox_due(future, past, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0], entry, "read back as written");
    assert!(s.outbox_due(past, past, 10).await.unwrap().is_empty());
    let stats = s.outbox_stats().await.unwrap();
    assert_eq!((stats.unpublished, stats.total), (1, 1));
    assert_eq!(stats.oldest_unpublished, Some(entry.created_at));
    // Published: the relay no longer takes it; the reconciler does once the publish is old.
    assert!(s.outbox_published(&entry.id).await.unwrap());
    assert!(s.outbox_due(future, past, 10).await.unwrap().is_empty());
    let due = s.outbox_due(past, future, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].publishes, 1);
    assert!(due[0].published_at.is_some());
    assert!(
        !s.outbox_withdraw(&entry.id).await.unwrap(),
        "published: stays"
    );
    assert_eq!(s.outbox_stats().await.unwrap().unpublished, 0);

    // A pre-flip's entry names the new fence; a refused flip writes none.
    for idx in [0, 1] {
        start(&s, "a", idx, 1).await;
        finish(&s, "a", idx, 1).await;
    }
    let rec = s.get_job("a").await.unwrap().unwrap();
    assert!(!entry.unsettled_in(&rec), "the set's rows are done");
    let (outcome, charged, e2) = s
        .preflip_dispatching(
            "a",
            0,
            &[EmojiStatus::Done],
            false,
            Action::Regenerate,
            "u",
            Some(charge("u", 1)),
        )
        .await
        .unwrap();
    assert_eq!(outcome, PreflipOutcome::Flipped { fence: 2 });
    assert!(charged.is_some());
    let e2 = e2.unwrap();
    assert_eq!(e2.id, "a:regenerate:0:2");
    assert_eq!(e2.message().fence, 2);
    let (outcome, _, none) = s
        .preflip_dispatching(
            "a",
            0,
            &[EmojiStatus::Done],
            false,
            Action::Regenerate,
            "u",
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome, PreflipOutcome::WrongState(EmojiStatus::Pending));
    assert!(none.is_none());
    // Withdrawn while unpublished (the enqueue side's rollback).
    assert!(s.outbox_withdraw(&e2.id).await.unwrap());
    assert!(!s.outbox_withdraw(&e2.id).await.unwrap());

    // approve-all: one entry for the bumped rows.
    start(&s, "a", 0, 2).await;
    finish(&s, "a", 0, 2).await;
    let (bumped, _, e3) = s
        .bump_done_dispatching("a", "u", None)
        .await
        .unwrap()
        .unwrap();
    let e3 = e3.unwrap();
    assert_eq!(e3.targets, bumped);
    assert_eq!(e3.action, Action::ApproveAll);
    let rec = s.get_job("a").await.unwrap().unwrap();
    assert!(e3.unsettled_in(&rec), "done rows wait for their approval");
    assert!(s.outbox_remove(&entry.id).await.unwrap());
    assert!(s.outbox_remove(&e3.id).await.unwrap());
    assert_eq!(s.outbox_stats().await.unwrap().total, 0);
}

/// Approve keeps a row `done`, so its outbox entry is what says "being approved": neither a
/// second approve nor approve-all bumps (or charges) the row until the entry goes.
async fn a_queued_approval_holds_its_row_until_its_entry_goes(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_user("u", "hash-u", false).await.unwrap();
    s.grant("u", 10, "sign-up", "g").await.unwrap();
    s.create_job(&new_job("a", "u", 3)).await.unwrap();
    for idx in 0..3 {
        start(&s, "a", idx, 1).await;
        finish(&s, "a", idx, 1).await;
    }
    let approve = |idx| {
        let s = s.clone();
        async move {
            s.preflip_dispatching(
                "a",
                idx,
                &[EmojiStatus::Done],
                true,
                Action::Approve,
                "u",
                Some(charge("u", 1)),
            )
            .await
            .unwrap()
        }
    };
    let (outcome, charged, e0) = approve(0).await;
    assert_eq!(outcome, PreflipOutcome::Flipped { fence: 2 });
    assert!(charged.is_some());
    let e0 = e0.unwrap();
    let (outcome, charged, none) = approve(0).await;
    assert_eq!(outcome, PreflipOutcome::InFlight);
    assert!(charged.is_none() && none.is_none());
    assert_eq!(s.balance("u").await.unwrap(), 9, "charged once");

    // approve-all takes the other rows only; then approve of those is in flight too.
    let (bumped, charged, e_all) = s
        .bump_done_dispatching("a", "u", Some(charge("u", 1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bumped, vec![(1, 2), (2, 2)]);
    assert_eq!(charged.len(), 2);
    let e_all = e_all.unwrap();
    assert_eq!(approve(1).await.0, PreflipOutcome::InFlight);
    let (again, charged, none) = s
        .bump_done_dispatching("a", "u", Some(charge("u", 1)))
        .await
        .unwrap()
        .unwrap();
    assert!(again.is_empty() && charged.is_empty() && none.is_none());
    assert_eq!(s.balance("u").await.unwrap(), 7);
    let rec = s.get_job("a").await.unwrap().unwrap();
    assert_eq!(
        rec.emoji.iter().map(|e| e.fence).collect::<Vec<_>>(),
        vec![2, 2, 2],
        "no fence moved"
    );

    // Given up (the worker removes the entry): the rows can be approved again.
    assert!(s.outbox_remove(&e0.id).await.unwrap());
    assert_eq!(approve(0).await.0, PreflipOutcome::Flipped { fence: 3 });
    assert!(s.outbox_remove(&e_all.id).await.unwrap());
    let (bumped, _, _) = s
        .bump_done_dispatching("a", "u", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        bumped,
        vec![(1, 3), (2, 3)],
        "emoji 0's approve is queued again"
    );
    // The new approve has its own entry, naming its row under its new fence.
    let entry = s
        .outbox_entry("a:approve:0:3")
        .await
        .unwrap()
        .expect("the approve's entry");
    assert_eq!(entry.targets, vec![(0, 3)]);
}

/// A generate-set key maps to the first job; a repeat is refused before anything is written.
async fn submission_keys_map_a_repeat_to_the_first_job(ctx: Ctx) {
    let s = ctx.store.clone();
    s.create_user("u", "hash-u", false).await.unwrap();
    s.grant("u", 10, "sign-up", "g").await.unwrap();
    s.create_job_dispatching(&new_job("first", "u", 1), Some(charge("u", 1)), Some("k"))
        .await
        .unwrap();
    let err = s
        .create_job_dispatching(&new_job("second", "u", 1), Some(charge("u", 1)), Some("k"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::IdemKeyTaken(id) if id == "first"),
        "{err}"
    );
    assert!(s.get_job("second").await.unwrap().is_none());
    assert_eq!(s.balance("u").await.unwrap(), 9, "charged once");
    assert_eq!(
        s.job_for_idempotency_key("u", "k")
            .await
            .unwrap()
            .as_deref(),
        Some("first")
    );
    // Keys are per user.
    s.create_user("v", "hash-v", false).await.unwrap();
    assert!(s.job_for_idempotency_key("v", "k").await.unwrap().is_none());
}
