//! Live tests of [`super`] against a real redis-server.
