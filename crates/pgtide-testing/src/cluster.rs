//! A PostgreSQL cluster of the test's own: created on a free loopback port with fsync and
//! synchronous_commit on, crash-restarted on demand (`pg_ctl -m immediate`), removed on drop.
//! As root, the server runs as the `postgres` OS user (initdb refuses root).
//!
//! Tests that need a server set up differently (TLS, passwords, a pooler in front) describe it
//! with [`Cluster::builder`]: extra `postgresql.conf` lines, files in the data directory (server
//! certificate and key), and a `pg_hba.conf` of their own. Panics on failure: it is test set-up.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running throwaway cluster; stopped and deleted on drop.
pub struct Cluster {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

/// What [`Cluster::builder`] sets up before the server starts.
#[derive(Default)]
pub struct ClusterBuilder {
    settings: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    hba: Option<Vec<String>>,
}

impl ClusterBuilder {
    /// Adds a `postgresql.conf` line (`ssl = on`).
    pub fn setting(mut self, line: impl Into<String>) -> Self {
        self.settings.push(line.into());
        self
    }

    /// Writes a file into the data directory, owned by the server and readable by it alone
    /// (the server refuses a key that others can read). Refer to it by its bare name in
    /// settings (`ssl_cert_file = 'server.crt'`): relative paths are read from the data
    /// directory.
    pub fn file(mut self, name: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }

    /// Replaces `pg_hba.conf` with these lines (the default trusts everyone, local and TCP).
    pub fn hba<I: IntoIterator<Item = S>, S: Into<String>>(mut self, lines: I) -> Self {
        self.hba = Some(lines.into_iter().map(Into::into).collect());
        self
    }

    /// Initialises and starts the cluster.
    pub fn start(self) -> Cluster {
        Cluster::start_with(self)
    }
}

fn server_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("no pg_ctl in /usr/lib/postgresql/*/bin")
        .1
}

impl Cluster {
    /// Initialises and starts a cluster with the given extra `postgresql.conf` lines.
    pub fn start(settings: &[&str]) -> Cluster {
        settings
            .iter()
            .fold(Cluster::builder(), |b, s| b.setting(*s))
            .start()
    }

    /// Describes a cluster with files, `pg_hba.conf` lines and settings of its own.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    fn start_with(b: ClusterBuilder) -> Cluster {
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = crate::unique_temp_dir("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = Cluster {
            port: crate::free_port(),
            bin: server_bin_dir(),
            dir,
            as_postgres,
        };
        if as_postgres {
            cluster.chown(&cluster.dir);
        }
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "-N"],
        );
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = on\nsynchronous_commit = on\nmax_connections = 200\n",
            cluster.port,
            cluster.dir.display()
        );
        for s in &b.settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let path = Path::new(&data).join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&path).unwrap();
        existing.push_str(&conf);
        std::fs::write(&path, existing).unwrap();
        if let Some(hba) = &b.hba {
            cluster.write_private("pg_hba.conf", (hba.join("\n") + "\n").as_bytes());
        }
        for (name, contents) in &b.files {
            cluster.write_private(name, contents);
        }
        cluster.up();
        cluster
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (trust, unless `pg_hba.conf` says
    /// otherwise).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The directory of the server's Unix socket (`host=<dir> port=<port>` connects through it,
    /// which `local` lines of `pg_hba.conf` govern).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Runs SQL as the `postgres` superuser through the Unix socket (`local` lines of
    /// `pg_hba.conf` must trust it); stops at the first error.
    pub fn psql(&self, sql: &str) {
        let port = self.port.to_string();
        let dir = self.dir.display().to_string();
        self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &dir,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ],
        );
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn chown(&self, path: &Path) {
        let status = Command::new("chown")
            .arg("postgres")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "chown postgres {}", path.display());
    }

    fn write_private(&self, name: &str, contents: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = Path::new(&self.data()).join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if self.as_postgres {
            self.chown(&path);
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let bin = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn up(&self) {
        let log = self.dir.join("log").display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"],
        );
    }

    /// Crash (no checkpoint, no clean shutdown: every backend dies at once), then start again
    /// with crash recovery.
    pub fn crash_restart(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        self.up();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let bin = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let _ = cmd
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
