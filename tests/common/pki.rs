//! A throw-away PKI for the TLS tests (`rediss://`): made with `openssl`
//! in a temp directory, removed on drop.

use std::path::PathBuf;
use std::process::Command;

use super::free_port;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// signed by it, plus a second CA that signed nothing we use.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Makes the CAs and certificates in a fresh temp directory (removed
    /// on drop) with `openssl`, which must be on PATH.
    pub fn make() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-test-pki-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl on PATH");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "wrong-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=wsgate test {ca}"),
            ]);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
            ]);
        }
        Pki { dir }
    }

    /// The path of one of the files: `ca.crt`, `wrong-ca.crt`,
    /// `server.crt`/`.key`, `client.crt`/`.key`.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
