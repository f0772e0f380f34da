//! Stand-alone init program for the namespace backend: only ever run by
//! `NamespaceBackend` as `airlock-ns-init __ns-init SYNC_FD ERR_FD`.
//! (The airlock binary can play this role itself; see the crate docs.)

fn main() {
    airlock_backend::ns_init_if_requested();
    eprintln!(
        "airlock-ns-init: internal helper of airlock's namespace backend; not for direct use"
    );
    std::process::exit(2);
}
