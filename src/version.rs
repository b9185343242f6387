//! `metastore --version`: etcd's layout (`etcd Version`, `Git SHA`, then the toolchain and
//! platform, as etcd's `etcdmain` prints them), with MetaStore's own version beside it.

/// The text `metastore --version` prints, one `Name: value` per line:
///
/// ```text
/// etcd Version: 3.5.0
/// Git SHA: 5457835
/// Rust Version: rustc 1.89.0 (29483883e 2025-08-04)
/// Go OS/Arch: linux/amd64
/// MetaStore Version: 0.1.0
/// ```
///
/// `etcd Version` is the etcd API version MetaStore implements (what `/version` and Status
/// report); `Go Version` becomes the Rust compiler's version; `Go OS/Arch` keeps etcd's name
/// and Go's spelling of the platform, so scripts that parse etcd's output work unchanged.
pub fn describe() -> String {
    format!(
        "etcd Version: {}\nGit SHA: {}\nRust Version: {}\nGo OS/Arch: {}/{}\nMetaStore Version: {}\n",
        crate::server::maintenance::ETCD_API_VERSION,
        env!("METASTORE_GIT_SHA"),
        env!("METASTORE_RUSTC_VERSION"),
        std::env::consts::OS,
        go_arch(std::env::consts::ARCH),
        env!("CARGO_PKG_VERSION"),
    )
}

/// Go's `GOARCH` name for a Rust target architecture.
fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64",
        "powerpc64le" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_are_etcds() {
        let text = super::describe();
        let names: Vec<&str> = text.lines().filter_map(|l| l.split(": ").next()).collect();
        assert_eq!(
            names,
            [
                "etcd Version",
                "Git SHA",
                "Rust Version",
                "Go OS/Arch",
                "MetaStore Version"
            ]
        );
        assert!(text.starts_with("etcd Version: 3.5."), "{text}");
        assert!(text.contains("Rust Version: rustc 1."), "{text}");
    }
}
