//! Redis pub/sub transport (being written).
