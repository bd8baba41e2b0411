pub mod moto_server;
pub mod redis_server;
pub mod rows;
pub mod worker_config;
