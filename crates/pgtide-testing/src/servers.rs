//! Servers of the test's own, on free loopback ports, killed with SIGKILL and started again on the
//! same data directory: brokers (NATS, Redis, moto for SQS, Kafka) and PgBouncer in front of a
//! PostgreSQL. Panics on failure: it is test set-up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{free_port, is_root, unique_temp_dir, ServerCert};

/// The arguments of a NATS server with JetStream on loopback, its store in `dir`.
fn nats_args(port: u16, dir: &Path) -> Vec<String> {
    vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-js".into(),
        "-sd".into(),
        dir.display().to_string(),
    ]
}

/// A server process of the test's own, killed (and its directory removed) on drop.
pub struct Server {
    /// The loopback port it listens on.
    pub port: u16,
    dir: PathBuf,
    program: &'static str,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
}

impl Server {
    /// NATS with JetStream on file storage. JetStream writes each message to its file before it
    /// acknowledges the publish and fsyncs on its own schedule (`sync_interval`, 2 minutes by
    /// default): a killed server process loses nothing written (the page cache survives it);
    /// only a power loss could lose the last interval, which a process kill does not test.
    pub fn nats() -> Server {
        Self::start("/usr/sbin/nats-server", nats_args)
    }

    /// NATS with JetStream that speaks TLS only, with the server certificate of `certs`.
    pub fn nats_tls(certs: &ServerCert) -> Server {
        let (cert, key) = (certs.cert.clone(), certs.key.clone());
        Self::start("/usr/sbin/nats-server", move |port, dir| {
            let mut args = nats_args(port, dir);
            args.extend([
                "--tls".into(),
                "--tlscert".into(),
                cert.display().to_string(),
                "--tlskey".into(),
                key.display().to_string(),
            ]);
            args
        })
    }

    /// Redis that speaks TLS only (no plaintext port), with the server certificate of `certs`
    /// and no client certificates asked for.
    pub fn redis_tls(certs: &ServerCert) -> Server {
        let (cert, key, ca) = (certs.cert.clone(), certs.key.clone(), certs.ca.clone());
        Self::start("redis-server", move |port, dir| {
            vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-ca-cert-file".into(),
                ca.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--save".into(),
                String::new(),
            ]
        })
    }

    /// Redis with an append-only file fsynced on every write, so a restarted server has every
    /// acknowledged command.
    pub fn redis() -> Server {
        Self::start("redis-server", |port, dir| {
            vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
                "--save".into(),
                String::new(),
            ]
        })
    }

    /// moto's server (`pip install 'moto[server]'`, which `.ci/run` does), answering SQS on
    /// loopback, through `moto/sqs_server.py` beside this crate: it makes moto's receives
    /// atomic (moto 5.2 can hand one message to two concurrent receives; see the script). Run
    /// by `python3` rather than moto's `moto_server` script, which a pyenv install only puts
    /// on the PATH after a `pyenv rehash`. It keeps everything in memory: a restart starts
    /// empty. Connect with [`Server::sqs_url`].
    pub fn sqs() -> Server {
        Self::start("python3", |port, _| {
            vec![
                concat!(env!("CARGO_MANIFEST_DIR"), "/moto/sqs_server.py").into(),
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]
        })
    }

    /// A Kafka-compatible broker: tansu (`$TANSU`, else `tansu` on the `PATH`; `.ci/run`
    /// installs it) with in-memory storage, so a restart starts empty. Clients reach it at
    /// [`Server::kafka_url`].
    pub fn kafka() -> Server {
        let program: &'static str = match std::env::var("TANSU") {
            Ok(path) => Box::leak(path.into_boxed_str()),
            Err(_) => "tansu",
        };
        Self::start(program, |port, _dir| {
            let url = format!("tcp://127.0.0.1:{port}");
            vec![
                "broker".into(),
                "--listener-url".into(),
                url.clone(),
                "--advertised-listener-url".into(),
                url,
                "--storage-engine".into(),
                "memory://tansu/".into(),
            ]
        })
    }

    /// The `sqs://` URL of a [`Server::sqs`], with moto's fixed test credentials and region.
    pub fn sqs_url(&self) -> String {
        format!("sqs://test:test@127.0.0.1:{}?region=us-east-1", self.port)
    }

    /// `kafka://127.0.0.1:<port>?single_record_batches=true`.
    pub fn kafka_url(&self) -> String {
        // tansu 0.6 answers a fetch from inside a record batch with the next batch: a group
        // restarting mid-batch would skip records, so every record gets a batch of its own.
        format!("kafka://127.0.0.1:{}?single_record_batches=true", self.port)
    }

    /// PgBouncer 1.18 (Debian's) in transaction mode in front of the PostgreSQL at
    /// `127.0.0.1:server_port`: trust authentication, every database name passed through,
    /// `default_pool_size = 2` server connections per database and user so that client
    /// transactions really share them, and `server_round_robin` so that consecutive transactions
    /// go to different server connections (what a busy pooler does; a quiet one reuses the last
    /// one, which would hide a session dependency). `settings` are more `[pgbouncer]` lines.
    /// Started as root, it drops to the `postgres` user itself (it refuses to run as root).
    pub fn pgbouncer(server_port: u16, settings: &[&str]) -> Server {
        let settings: Vec<String> = settings.iter().map(|s| (*s).to_owned()).collect();
        Self::start("/usr/sbin/pgbouncer", move |port, dir| {
            let userlist = dir.join("userlist.txt");
            std::fs::write(&userlist, "\"postgres\" \"\"\n").unwrap();
            let mut ini = format!(
                "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = transaction\n\
                 default_pool_size = 2\nmax_client_conn = 500\nserver_round_robin = 1\n\
                 server_reset_query =\n",
                userlist.display()
            );
            if is_root() {
                ini.push_str("user = postgres\n");
            }
            for s in &settings {
                ini.push_str(s);
                ini.push('\n');
            }
            let path = dir.join("pgbouncer.ini");
            std::fs::write(&path, ini).unwrap();
            vec![path.display().to_string()]
        })
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn start(program: &'static str, args: impl Fn(u16, &Path) -> Vec<String>) -> Server {
        let port = free_port();
        let dir = unique_temp_dir("server");
        std::fs::create_dir_all(&dir).unwrap();
        let server = Server {
            port,
            args: args(port, &dir),
            dir,
            program,
            child: Mutex::new(None),
        };
        server.up();
        server
    }

    fn up(&self) {
        let child = Command::new(self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not start", self.program);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL, then start again on the same data.
    pub fn crash_restart(&self) {
        self.down();
        self.up();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
