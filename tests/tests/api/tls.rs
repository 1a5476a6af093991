//! TLS to the broker: jobs end to end over `amqps://` with the test CA only and with a client
//! certificate; a wrong CA and a plaintext port fail as TLS failures, never in plaintext; and
//! `http.fetch` fetches `https://` pages.
//!
//! Needs the TLS node of `scripts/rabbitmq-tls.sh` (`TLS_AMQP_URL`, `TLS_PLAIN_PORT_URL`,
//! `TLS_CERT_DIR`; `scripts/test.sh` starts it next to a broker in `AMQP_URL`). Without it the
//! tests print that they were skipped.

use std::{process::Stdio, time::Duration};

use consumer::{Readiness, Registry};
use tokio::io::AsyncReadExt;

use crate::{
    children::{ChildConsumer, run_producer},
    helpers::{TestApp, binary, within},
};

struct Tls {
    url: String,
    plain_port_url: String,
    dir: String,
}

fn tls() -> Option<Tls> {
    Some(Tls {
        url: std::env::var("TLS_AMQP_URL").ok()?,
        plain_port_url: std::env::var("TLS_PLAIN_PORT_URL").ok()?,
        dir: std::env::var("TLS_CERT_DIR").ok()?,
    })
}

impl Tls {
    /// The TLS URL with `params` (file names relative to the certificate directory).
    fn with(&self, base: &str, params: &[(&str, &str)]) -> String {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}/{v}", self.dir))
            .collect();
        format!("{base}?{}", query.join("&"))
    }
}

/// A namespace on the TLS node, reached over `amqps://` with the CA only.
async fn app_over_tls(tls: &Tls) -> TestApp {
    TestApp::on_broker(tls.with(&tls.url, &[("cacertfile", "ca.pem")]), |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_end_to_end_over_amqps_with_the_ca_only_and_with_a_client_certificate() {
    let Some(tls) = tls() else {
        crate::helpers::skip(
            "TLS_AMQP_URL is not set (scripts/rabbitmq-tls.sh)",
            "REQUIRE_TLS",
        );
        return;
    };
    // Arrange: a consumer process over TLS with the CA only
    let app = app_over_tls(&tls).await;
    let consumer = ChildConsumer::spawn_program(&app, &binary("consumer"), &[]);

    // Act: the producer over TLS with the CA only, then with a client certificate
    let (ok, stderr, _) =
        run_producer(&app, &app.common.amqp_url, &["--count", "200", "--wait"]).await;
    let with_cert = tls.with(
        &tls.url,
        &[
            ("cacertfile", "ca.pem"),
            ("certfile", "client.pem"),
            ("keyfile", "client.key"),
        ],
    );
    let (cert_ok, cert_stderr, _) =
        run_producer(&app, &with_cert, &["--count", "200", "--wait"]).await;

    // Assert
    assert!(ok, "{stderr}");
    assert!(stderr.contains("results: ok 200"), "{stderr}");
    assert!(cert_ok, "{cert_stderr}");
    assert!(cert_stderr.contains("results: ok 200"), "{cert_stderr}");
    consumer.terminate().await;
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_a_plaintext_port_fails_as_tls_and_says_why() {
    let Some(tls) = tls() else {
        crate::helpers::skip(
            "TLS_AMQP_URL is not set (scripts/rabbitmq-tls.sh)",
            "REQUIRE_TLS",
        );
        return;
    };
    // Arrange
    let app = app_over_tls(&tls).await;
    let wrong_ca = tls.with(&tls.url, &[("cacertfile", "wrong-ca.pem")]);
    let plain_port = tls.with(&tls.plain_port_url, &[("cacertfile", "ca.pem")]);

    // Act: the producer with each, and a consumer with the wrong CA
    let quick = ["--count", "1", "--reconnect-timeout", "3"];
    let (wrong_ok, wrong_stderr, wrong_secs) = run_producer(&app, &wrong_ca, &quick).await;
    let (plain_ok, plain_stderr, plain_secs) = run_producer(&app, &plain_port, &quick).await;
    let mut settings = app.consumer_settings();
    settings.common.amqp_url = wrong_ca.clone();
    let readiness = Readiness::default();
    let consumer = app.spawn_consumer_with(settings, Registry::builtin(), readiness.clone());
    let problem = within("the consumer to report its TLS failure", async {
        loop {
            if let Some(problem) = readiness.problem() {
                return problem;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Assert
    println!("wrong CA: {wrong_secs:.1} s; plaintext port: {plain_secs:.1} s");
    assert!(!wrong_ok && !plain_ok);
    for (stderr, why) in [
        (&wrong_stderr, "not signed by a trusted CA"),
        (&plain_stderr, "plaintext port"),
        (&problem, "not signed by a trusted CA"),
    ] {
        assert!(stderr.contains("TLS handshake"), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        assert!(
            !stderr.contains("guest:guest"),
            "the password shows: {stderr}"
        );
    }
    assert!(wrong_secs < 60.0 && plain_secs < 60.0);
    assert!(!readiness.is_ready());
    consumer.stop().await.unwrap();
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_fetch_fetches_https_pages() {
    let Some(tls) = tls() else {
        crate::helpers::skip(
            "TLS_CERT_DIR is not set (scripts/rabbitmq-tls.sh)",
            "REQUIRE_TLS",
        );
        return;
    };
    // Arrange: an HTTPS server with the test CA's server certificate (localhost), and a
    // consumer process that trusts that CA (SSL_CERT_FILE, as on a real host)
    let app = TestApp::new().await;
    let root = std::env::temp_dir().join(format!("https-{}", app.common.namespace));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("page.txt"),
        "A page fetched over TLS. Second sentence.",
    )
    .unwrap();
    let serve = "import http.server,ssl,sys\n\
        ctx=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
        ctx.load_cert_chain(sys.argv[1],sys.argv[2])\n\
        s=http.server.HTTPServer(('127.0.0.1',0),http.server.SimpleHTTPRequestHandler)\n\
        s.socket=ctx.wrap_socket(s.socket,server_side=True)\n\
        print(s.server_address[1],flush=True)\n\
        s.serve_forever()";
    let mut server = tokio::process::Command::new("python3")
        .args(["-c", serve])
        .arg(format!("{}/server.pem", tls.dir))
        .arg(format!("{}/server.key", tls.dir))
        .current_dir(&root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = server.stdout.take().unwrap();
    let port = within("the HTTPS server's port", async {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    })
    .await;
    let ca = format!("{}/ca.pem", tls.dir);
    let consumer = ChildConsumer::spawn_with_env(
        &app,
        &binary("consumer"),
        &[],
        &[("SSL_CERT_FILE", ca.as_str())],
    );

    // Act
    let url = format!("https://localhost:{}/page.txt", port.trim());
    let id = app
        .publish_job("http.fetch", serde_json::json!({ "url": url }))
        .await;
    let results = app.results(1).await;

    // Assert
    let result = results[0].json();
    assert_eq!(result["job_id"], id.to_string());
    assert_eq!(result["status"], "ok", "{result}");
    consumer.terminate().await;
    let _ = std::fs::remove_dir_all(&root);
    app.teardown().await;
}

/// Makes a certificate for `localhost` signed by the TLS node's *unrelated* CA
/// (`wrong-ca.pem`), in `dir`; returns (certificate, key).
fn localhost_cert_from_the_wrong_ca(tls: &Tls, dir: &std::path::Path) -> (String, String) {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (key, csr, ext, cert) = (
        path("web.key"),
        path("web.csr"),
        path("web.ext"),
        path("web.pem"),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &key,
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=localhost",
    ]);
    let (ca, ca_key) = (
        format!("{}/wrong-ca.pem", tls.dir),
        format!("{}/wrong-ca.key", tls.dir),
    );
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-set_serial",
        "7",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    (cert, key)
}

/// The management source's error on `producer serve`'s dashboard, run over `amqp_url` with
/// `--management-url` and `SSL_CERT_FILE` (the system's trusted roots) as given.
async fn management_error(app: &TestApp, amqp_url: &str, management: &str, roots: &str) -> String {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut serve = crate::children::producer_command(app, amqp_url)
        .args(["serve", "--listen", &addr.to_string()])
        .args(["--management-url", management])
        .env("SSL_CERT_FILE", roots)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{addr}/dashboard/data");
    let error = within("the dashboard to report on the management API", async {
        loop {
            let url = url.clone();
            let answer = tokio::task::spawn_blocking(move || {
                let mut response = ureq::get(&url).call().ok()?;
                let body: serde_json::Value =
                    serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()?;
                body["sources"]["management"]["error"]
                    .as_str()
                    .map(str::to_owned)
            })
            .await
            .unwrap();
            if let Some(error) = answer {
                return error;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let _ = serve.start_kill();
    let _ = serve.wait().await;
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_trusts_the_cacertfile_alone_for_the_management_api() {
    let Some(tls) = tls() else {
        crate::helpers::skip(
            "TLS_AMQP_URL is not set (scripts/rabbitmq-tls.sh)",
            "REQUIRE_TLS",
        );
        return;
    };
    // Arrange: an HTTPS server whose certificate comes from a CA the system trusts
    // (`SSL_CERT_FILE`) but the AMQP URL's `cacertfile` does not name.
    let app = app_over_tls(&tls).await;
    let dir = std::env::temp_dir().join(format!("qw-mgmt-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = localhost_cert_from_the_wrong_ca(&tls, &dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut web = tokio::process::Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-cert", &cert, "-key", &key])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    within("the HTTPS server to listen", async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let management = format!("https://localhost:{port}");
    let system_roots = format!("{}/wrong-ca.pem", tls.dir);

    // Act: the dashboard over amqps with the node's CA as cacertfile; and, as the control, over
    // plain amqp (no cacertfile: the system's roots apply).
    let with_cacertfile = tls.with(&tls.url, &[("cacertfile", "ca.pem")]);
    let refused = management_error(&app, &with_cacertfile, &management, &system_roots).await;
    let control = management_error(&app, &tls.plain_port_url, &management, &system_roots).await;
    let _ = web.start_kill();
    let _ = std::fs::remove_dir_all(&dir);

    // Assert: with a cacertfile, a certificate the system trusts is refused; without one, the
    // same server is reached (its page is not the management API's JSON, hence some error,
    // but not a certificate's).
    assert!(
        refused.to_lowercase().contains("certificate") || refused.contains("UnknownIssuer"),
        "{refused}"
    );
    assert!(
        !control.to_lowercase().contains("certificate") && !control.contains("UnknownIssuer"),
        "the control must get past TLS, or SSL_CERT_FILE is not honoured: {control}"
    );
    app.teardown().await;
}
