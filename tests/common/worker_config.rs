//! The worker settings every integration suite starts from: the tiny model, a SQLite file and
//! a results folder under the test's temporary directory, and leases, blocks and retries short
//! enough that a crash, a reclaim or a dead letter happens within a test's patience.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use popcon_worker::blobs::BlobsConfig;
use popcon_worker::config::{EngineConfig, RetryConfig, ShutdownConfig, StoreConfig, WorkerConfig};
use popcon_worker::queue::QueueConfig;

/// `sqlite://DIR/popcon.db`.
pub fn db_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("popcon.db").display())
}

/// A queue on `redis_url` for `consumer`: 1.5 s lease, 200 ms block, 3 deliveries.
pub fn queue_config(redis_url: &str, consumer: &str) -> QueueConfig {
    QueueConfig {
        redis_url: redis_url.to_string(),
        consumer: consumer.to_string(),
        lease: Duration::from_millis(1500),
        block: Duration::from_millis(200),
        max_deliveries: 3,
        connect_patience: Duration::from_secs(10),
        ..QueueConfig::default()
    }
}

/// A worker on `redis_url` with its database and results under `dir`; override fields with
/// struct update syntax (`WorkerConfig { blobs, ..worker_config(..) }`).
pub fn worker_config(redis_url: &str, dir: &Path, consumer: &str) -> WorkerConfig {
    WorkerConfig {
        queue: queue_config(redis_url, consumer),
        store: StoreConfig { url: db_url(dir) },
        blobs: BlobsConfig::at(dir.join("results")),
        engine: EngineConfig {
            model: "tiny".into(),
            models_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/models").into(),
            ..EngineConfig::default()
        },
        http: Default::default(),
        shutdown: ShutdownConfig {
            grace: Duration::from_secs(10),
        },
        retry: RetryConfig {
            base: Duration::from_millis(50),
            max: Duration::from_millis(200),
            reclaim_every: Duration::from_millis(200),
        },
        reconcile: Default::default(),
    }
}
