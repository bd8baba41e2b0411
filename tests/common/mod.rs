pub mod moto_server;
pub mod redis_server;
pub mod worker_config;
