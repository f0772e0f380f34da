//! airlock-egress (stub, being written).
