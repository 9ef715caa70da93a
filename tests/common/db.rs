//! Real throwaway database servers for integration tests: a PostgreSQL cluster
//! ([`Postgres`]) or a MariaDB server ([`MariaDb`]), each initialised in a fresh temp dir
//! under [`std::env::temp_dir`], listening on a free `127.0.0.1` port and on a unix socket
//! inside that dir, logging every statement to a file there, and killed (temp dir removed) on
//! drop. They never touch a system instance.
//!
//! The binaries come from Debian's `postgresql` and `mariadb-server` packages, which
//! `bash .ci/deps` installs; a start without them panics saying so (tests do not skip).
//! As root the servers run as the `postgres` / `mysql` OS users (PostgreSQL refuses root),
//! so the temp dir is chowned to that user and must be reachable by it.
//!
//! Authentication is real: TCP logins need the right password (PostgreSQL `scram-sha-256`,
//! MariaDB `mysql_native_password`); only the harness's own admin client, over the unix
//! socket, logs in without one. Create MariaDB users as `'name'@'%'` (or `'name'@'127.0.0.1'`):
//! the server runs with `--skip-name-resolve`, so a TCP login never matches `@'localhost'`.
//!
//! Durability is traded for speed only where a process crash cannot lose commits
//! (`fsync=off`; InnoDB `flush_log_at_trx_commit=2`, no fsync), so data committed before
//! [`Postgres::kill9`] / [`MariaDb::kill9`] is still there after `start_again`.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

/// How long a start (or restart) may take before it panics with the server's log tail.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL cluster of its own (initdb in a temp dir), superuser `postgres`.
pub struct Postgres {
    /// The TCP port on 127.0.0.1 (the same after [`Postgres::start_again`]).
    pub port: u16,
    dir: TempDir,
    bin: PathBuf,
    /// Running as root: server commands go through `runuser -u postgres --`.
    as_postgres: bool,
    /// The postmaster (or, as root, the `runuser` wrapping it); `None` after `kill9`.
    child: Option<Child>,
}

impl Postgres {
    /// The superuser `postgres`'s password (TCP logins check it; the socket is trusted).
    pub const PASSWORD: &'static str = "xgate-pg-superuser";

    /// Whether PostgreSQL's server and client binaries are installed (`bash .ci/deps`).
    pub fn available() -> bool {
        pg_bindir().is_some()
    }

    /// initdb in a fresh temp dir (as the `postgres` OS user via `runuser -u postgres --`
    /// when running as root, directly otherwise), then start it on a free 127.0.0.1 port
    /// with the unix socket in the temp dir, `log_statement=all` to `server.log` there and
    /// `fsync=off`, and wait (30 s at most) until it accepts connections; panics with the
    /// log tail otherwise.
    pub fn start() -> Postgres {
        let bin = pg_bindir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL not found (initdb, postgres, pg_isready, psql in \
                 /usr/lib/postgresql/<version>/bin or on PATH): run `bash .ci/deps`"
            )
        });
        let as_postgres = is_root();
        assert!(
            !as_postgres || os_user_exists("postgres"),
            "running as root but there is no `postgres` OS user to run PostgreSQL as \
             (it refuses root): run `bash .ci/deps`"
        );
        let dir = temp_dir_for("xgate-pg-", as_postgres.then_some("postgres"));
        let mut pg = Postgres {
            port: free_port(),
            dir,
            bin,
            as_postgres,
            child: None,
        };
        let pwfile = pg.dir.path().join("pwfile");
        fs::write(&pwfile, format!("{}\n", Self::PASSWORD)).unwrap();
        let out = pg
            .server_cmd("initdb")
            .arg("-D")
            .arg(pg.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        let _ = fs::remove_file(&pwfile);
        check(&out, "initdb");
        pg.spawn_and_wait(1);
        pg
    }

    /// A connection URL for the superuser `postgres` over TCP, database `postgres`.
    pub fn url(&self) -> String {
        self.url_as("postgres", Self::PASSWORD, "postgres")
    }

    /// A connection URL for `user`/`password` over TCP to database `db`
    /// (each part percent-encoded).
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            url_encode(user),
            url_encode(password),
            self.port,
            url_encode(db)
        )
    }

    /// Run SQL (one or more `;`-separated statements, each in its own transaction unless
    /// the SQL says otherwise) through `psql -X -q -At -v ON_ERROR_STOP=1` as `postgres`
    /// over the unix socket; returns stdout (rows as `a|b` lines). Panics with stderr on
    /// failure.
    pub fn psql(&self, sql: &str) -> String {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-At", "-w", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-f", "-"]);
        let out = run_with_stdin(cmd, sql);
        check(&out, &format!("psql {sql:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The statement log so far: the server log (`LOG:  statement: ...` lines, and
    /// `execute <name>: ...` for the extended protocol), across restarts.
    pub fn statement_log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// `kill -9` the postmaster (a crash): its connections drop and the port closes.
    /// Its backends notice and exit on their own.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        match self.postmaster_pid() {
            Some(pid) => signal("-9", &pid),
            None => {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }

    /// Start again on the same port and data dir (crash recovery runs) and wait until
    /// ready; panics with the log tail if it does not come up in 30 s.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "Postgres::start_again: the server is still running (call kill9 first)"
        );
        // Right after kill9 the old backends may still hold the shared-memory interlock
        // for a moment ("pre-existing shared memory block is still in use"): retry.
        self.spawn_and_wait(20);
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn postmaster_pid(&self) -> Option<String> {
        first_line(&self.data_dir().join("postmaster.pid"))
    }

    /// A command running the named binary from the PostgreSQL bindir as the server's OS
    /// user, in the temp dir.
    fn server_cmd(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    /// Spawn the postmaster and wait until it is ready; if it exits early, try again up
    /// to `attempts` times in all (200 ms apart).
    fn spawn_and_wait(&mut self, attempts: u32) {
        self.spawn_and_wait_moved(attempts, 0)
    }

    fn spawn_and_wait_moved(&mut self, attempts: u32, mut moved: u32) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for attempt in 1..=attempts {
            let log = open_append(&self.log_path());
            let child = self
                .server_cmd("postgres")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-p", &self.port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!(
                    "unix_socket_directories={}",
                    self.dir.path().display()
                ))
                .args(["-c", "log_statement=all"])
                .args(["-c", "logging_collector=off"])
                .args(["-c", "fsync=off"])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            self.child = Some(child);
            match self.wait_ready(deadline) {
                Ok(()) => return,
                Err(_) if attempt < attempts && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(200));
                }
                // A first start whose free port another process took first: another port.
                Err(_) if attempts == 1 && moved < 5 && port_taken(&self.log_path()) => {
                    moved += 1;
                    self.port = free_port();
                    return self.spawn_and_wait_moved(attempts, moved);
                }
                Err(status) => panic!(
                    "PostgreSQL on 127.0.0.1:{} exited ({status}) before accepting \
                     connections; {}:\n{}",
                    self.port,
                    self.log_path().display(),
                    tail(&self.log_path(), 40)
                ),
            }
        }
    }

    /// Poll `pg_isready` over TCP until it answers; `Err` if the server exits first.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), ExitStatus> {
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(status);
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-t", "1"])
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                panic!(
                    "PostgreSQL on 127.0.0.1:{} not accepting connections after {:?}; {}:\n{}",
                    self.port,
                    READY_TIMEOUT,
                    self.log_path().display(),
                    tail(&self.log_path(), 40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postgres {
    /// Immediate shutdown (SIGQUIT to the postmaster, what `pg_ctl stop -m immediate`
    /// sends: it takes its backends down with it), `kill -9` if that takes over 10 s;
    /// then the temp dir goes.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = self.postmaster_pid() {
            signal("-QUIT", &pid);
            if wait_timeout(&mut child, Duration::from_secs(10)).is_some() {
                return;
            }
            signal("-9", &pid);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A MariaDB server of its own (mariadb-install-db in a temp dir), superuser `root`.
pub struct MariaDb {
    /// The TCP port on 127.0.0.1 (the same after [`MariaDb::start_again`]).
    pub port: u16,
    dir: TempDir,
    bins: MariaBins,
    /// `--user=` for install-db and the server when running as root (`mysql`, or `root`
    /// where there is no `mysql` OS user).
    os_user: Option<&'static str>,
    /// mariadbd itself (it drops to `--user` in-process); `None` after `kill9`.
    child: Option<Child>,
    /// Length of general.log once the harness's own setup statements were logged.
    log_start: u64,
}

struct MariaBins {
    server: PathBuf,
    install_db: PathBuf,
    client: PathBuf,
    admin: PathBuf,
}

impl MariaDb {
    /// `root`'s password for TCP logins (root over the unix socket needs none).
    pub const PASSWORD: &'static str = "xgate-mariadb-root";

    /// Whether MariaDB's server, install-db and client binaries are installed
    /// (`bash .ci/deps`).
    pub fn available() -> bool {
        maria_bins().is_some()
    }

    /// mariadb-install-db into a fresh temp datadir (root with an empty password, which
    /// is then set to [`MariaDb::PASSWORD`] for `root@127.0.0.1`), start `mariadbd
    /// --no-defaults` on a free 127.0.0.1 port with its socket, pid file, error log and
    /// general log (every statement) in the temp dir, small InnoDB buffers and no binlog,
    /// and wait (30 s at most) until `mariadb-admin ping` answers; panics with the error
    /// log tail otherwise.
    pub fn start() -> MariaDb {
        let bins = maria_bins().unwrap_or_else(|| {
            panic!(
                "MariaDB not found (mariadbd, mariadb-install-db, mariadb, mariadb-admin in \
                 /usr/sbin, /usr/bin or on PATH): run `bash .ci/deps`"
            )
        });
        let os_user = if !is_root() {
            None
        } else if os_user_exists("mysql") {
            Some("mysql")
        } else {
            Some("root")
        };
        let dir = temp_dir_for("xgate-mariadb-", os_user.filter(|u| *u != "root"));
        let mut db = MariaDb {
            port: free_port(),
            dir,
            bins,
            os_user,
            child: None,
            log_start: 0,
        };
        let mut install = Command::new(&db.bins.install_db);
        install.arg("--no-defaults"); // must come first
        if let Some(u) = db.os_user {
            install.arg(format!("--user={u}"));
        }
        // Its own tmpdir: a MariaDB server removes every `#sql*` file in its tmpdir at start,
        // so servers sharing /tmp delete each other's temporary tables (seen when the
        // MariaDB tests' bootstraps ran at once).
        let out = install
            .arg(format!("--datadir={}", db.data_dir().display()))
            .arg(format!("--tmpdir={}", db.dir.path().display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                "--skip-log-bin",
            ])
            .args(INNODB_OPTS)
            .current_dir(db.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        check(&out, "mariadb-install-db");
        db.spawn_and_wait(1);
        // install-db's root accounts have no password; TCP logins get one (the socket's
        // root@localhost keeps none, for `sql`). Not in bootstrap: install-db's
        // --extra-file runs with --skip-grant-tables, where ALTER USER is refused.
        db.sql(&format!(
            "ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '{}';",
            Self::PASSWORD
        ));
        db.log_start = fs::metadata(db.general_log()).map_or(0, |m| m.len());
        db
    }

    /// A connection URL for `root` over TCP, database `mysql`.
    pub fn url(&self) -> String {
        self.url_as("root", Self::PASSWORD, "mysql")
    }

    /// A connection URL for `user`/`password` over TCP to database `db`
    /// (each part percent-encoded).
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "mysql://{}:{}@127.0.0.1:{}/{}",
            url_encode(user),
            url_encode(password),
            self.port,
            url_encode(db)
        )
    }

    /// Run SQL (one or more `;`-separated statements) through the `mariadb` client as root
    /// over the unix socket in batch mode (`-N -B`: tab-separated rows, no header); returns
    /// stdout. Stops at the first error and panics with stderr.
    pub fn sql(&self, sql: &str) -> String {
        let mut cmd = Command::new(&self.bins.client);
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", "root", "-N", "-B"]);
        let out = run_with_stdin(cmd, sql);
        check(&out, &format!("mariadb {sql:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The statement log so far: the general log (`Connect`, `Query`, `Quit` lines), from
    /// after the harness's own setup, across restarts.
    pub fn statement_log(&self) -> String {
        let all = fs::read(self.general_log()).unwrap_or_default();
        let start = usize::try_from(self.log_start).unwrap_or(0).min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    }

    /// `kill -9` mariadbd (a crash): its connections drop and the port closes.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        match first_line(&self.pid_file()) {
            Some(pid) => signal("-9", &pid),
            None => {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }

    /// Start again on the same port and datadir (InnoDB crash recovery runs) and wait
    /// until ready; panics with the error log tail if it does not come up in 30 s.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "MariaDb::start_again: the server is still running (call kill9 first)"
        );
        self.spawn_and_wait(20);
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadbd.sock")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("mariadbd.pid")
    }

    fn general_log(&self) -> PathBuf {
        self.dir.path().join("general.log")
    }

    fn error_log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    fn stdout_log(&self) -> PathBuf {
        self.dir.path().join("stdout.log")
    }

    fn log_tails(&self) -> String {
        format!(
            "{}:\n{}\n{}:\n{}",
            self.error_log().display(),
            tail(&self.error_log(), 40),
            self.stdout_log().display(),
            tail(&self.stdout_log(), 10)
        )
    }

    /// Spawn mariadbd and wait until it is ready; if it exits early, try again up to
    /// `attempts` times in all (200 ms apart).
    fn spawn_and_wait(&mut self, attempts: u32) {
        self.spawn_and_wait_moved(attempts, 0)
    }

    fn spawn_and_wait_moved(&mut self, attempts: u32, mut moved: u32) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for attempt in 1..=attempts {
            let out = open_append(&self.stdout_log());
            let mut cmd = Command::new(&self.bins.server);
            cmd.arg("--no-defaults"); // must come first
            if let Some(u) = self.os_user {
                cmd.arg(format!("--user={u}"));
            }
            let child = cmd
                .arg(format!("--datadir={}", self.data_dir().display()))
                .arg(format!("--socket={}", self.socket().display()))
                .arg(format!("--pid-file={}", self.pid_file().display()))
                .arg(format!("--tmpdir={}", self.dir.path().display()))
                .arg(format!("--port={}", self.port))
                .args([
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    "--skip-log-bin",
                ])
                .arg("--general-log=1")
                .arg(format!(
                    "--general-log-file={}",
                    self.general_log().display()
                ))
                .arg(format!("--log-error={}", self.error_log().display()))
                .args(INNODB_OPTS)
                .arg("--innodb-flush-log-at-trx-commit=2")
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            self.child = Some(child);
            match self.wait_ready(deadline) {
                Ok(()) => return,
                Err(_) if attempt < attempts && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(200));
                }
                // A first start whose free port another process took first: another port.
                Err(_) if attempts == 1 && moved < 5 && port_taken(&self.error_log()) => {
                    moved += 1;
                    self.port = free_port();
                    return self.spawn_and_wait_moved(attempts, moved);
                }
                Err(status) => panic!(
                    "MariaDB on 127.0.0.1:{} exited ({status}) before accepting connections; {}",
                    self.port,
                    self.log_tails()
                ),
            }
        }
    }

    /// Poll `mariadb-admin ping` over the socket until it answers; `Err` if the server
    /// exits first.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), ExitStatus> {
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(status);
            }
            let ready = Command::new(&self.bins.admin)
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket().display()))
                .args(["-u", "root", "--connect-timeout=1", "ping"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                panic!(
                    "MariaDB on 127.0.0.1:{} not accepting connections after {:?}; {}",
                    self.port,
                    READY_TIMEOUT,
                    self.log_tails()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MariaDb {
    /// `kill -9` mariadbd (nothing to keep); then the temp dir goes.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Small, fast InnoDB for install-db and the server alike (no fsync, no doublewrite).
const INNODB_OPTS: [&str; 4] = [
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=8M",
    "--innodb-flush-method=nosync",
    "--skip-innodb-doublewrite",
];

/// The newest `/usr/lib/postgresql/<N>/bin` (Debian), else the directory of `initdb` on
/// PATH; it must hold the server and client binaries the harness runs.
fn pg_bindir() -> Option<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let Ok(version) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let bin = e.path().join("bin");
            if bin.join("initdb").is_file() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    let bin = best
        .map(|(_, bin)| bin)
        .or_else(|| Some(find_program("initdb")?.parent()?.to_path_buf()))?;
    ["initdb", "postgres", "pg_isready", "psql"]
        .iter()
        .all(|p| bin.join(p).is_file())
        .then_some(bin)
}

fn maria_bins() -> Option<MariaBins> {
    Some(MariaBins {
        server: find_program("mariadbd")?,
        install_db: find_program("mariadb-install-db")?,
        client: find_program("mariadb")?,
        admin: find_program("mariadb-admin")?,
    })
}

/// `name` in /usr/sbin or /usr/bin (a non-root PATH often lacks /usr/sbin), else on PATH.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn os_user_exists(user: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A fresh temp dir under [`std::env::temp_dir`], chowned to `owner` (when running as
/// root for a server that runs as that user), who must be able to write in it.
fn temp_dir_for(prefix: &str, owner: Option<&str>) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    if let Some(owner) = owner {
        let out = Command::new("chown")
            .arg(format!("{owner}:{owner}"))
            .arg(dir.path())
            .output()
            .unwrap();
        check(&out, "chown");
        let reachable = Command::new("runuser")
            .args(["-u", owner, "--", "test", "-w"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            reachable,
            "the `{owner}` OS user cannot write in {} (every parent dir needs o+x): set \
             TMPDIR to a dir it can reach, e.g. /tmp",
            dir.path().display()
        );
    }
    dir
}

/// A port that was free on 127.0.0.1 a moment ago.
/// Whether the server's last words were that its port was taken (a free port handed out,
/// then bound by another process before the server bound it).
fn port_taken(log: &std::path::Path) -> bool {
    tail(log, 10).contains("Address already in use")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kill <sig> <pid>`; a process that is already gone is fine.
fn signal(sig: &str, pid: &str) {
    let _ = Command::new("kill")
        .args([sig, pid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Run `cmd` with `input` on its stdin (written from a thread, so a large input cannot
/// deadlock against a large output).
fn run_with_stdin(mut cmd: Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_owned();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    out
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn open_append(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

fn first_line(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_owned())
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = read_lossy(path);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Percent-encode everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
