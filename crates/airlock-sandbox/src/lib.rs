//! airlock-sandbox (stub, being written).
