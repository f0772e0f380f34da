//! airlock-store (stub, being written).
