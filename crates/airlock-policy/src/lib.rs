//! airlock-policy (stub, being written).
