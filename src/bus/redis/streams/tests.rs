//! Live tests of the stream consumer against a real redis-server.
