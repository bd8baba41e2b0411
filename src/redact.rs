//! Connection URLs made safe for logs and error messages.
//!
//! A password may hold any character once percent-encoded, and operators often paste raw ones
//! (`@`, `:`, `/`): splitting the string at `@` or `:` then leaks part of the secret. So the
//! URL is parsed by the `url` crate (WHATWG rules, the same a browser uses to find the
//! userinfo) and the password replaced; input that does not parse is replaced as a whole by a
//! fixed placeholder, since nothing about it can be shown safely.

/// What [`redact_url`] prints for input it cannot parse.
pub const UNPARSEABLE: &str = "<unparseable URL>";

/// `url` with its password (if any) replaced by `***`; user, host, port, path and query kept.
/// A string that is not a URL with a scheme becomes [`UNPARSEABLE`] — except a bare SQLite
/// path (no `://`), which holds no credentials and is kept so errors name the file.
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") && !url.contains('@') {
        return url.to_string();
    }
    match url::Url::parse(url) {
        // `u:secret@h` parses as scheme `u` with the path `secret@h`: an `@` outside an
        // authority means we cannot tell where a secret ends.
        Ok(u) if u.host().is_none() && url.contains('@') => UNPARSEABLE.to_string(),
        Ok(mut u) => {
            if u.password().is_some() && u.set_password(Some("***")).is_err() {
                return UNPARSEABLE.to_string();
            }
            // `url` keeps a raw `@` of the userinfo percent-encoded; a user name that held
            // the password (no `:` in the userinfo) is still a secret we cannot tell apart.
            u.to_string()
        }
        Err(_) => UNPARSEABLE.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_replaced_and_the_rest_kept() {
        assert_eq!(
            redact_url("postgres://u:secret@db.example:5432/jobs?sslmode=require"),
            "postgres://u:***@db.example:5432/jobs?sslmode=require"
        );
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
    }

    #[test]
    fn raw_special_characters_in_the_password_leak_nothing() {
        for (url, secret) in [
            ("postgres://u:p@ss@127.0.0.1:1/db", "p@ss"),
            ("postgres://u:a:b:c@127.0.0.1:1/db", "a:b:c"),
            ("redis://:s3cr%40t%2Fx@h:6379/0", "s3cr"),
            ("postgres://u:pa/ss@h/db", "pa/ss"),
        ] {
            let r = redact_url(url);
            assert!(!r.contains(secret), "{url} -> {r}");
            let leaked: Vec<&str> = secret.split(['@', ':', '/', '%']).collect();
            for part in leaked.iter().filter(|p| p.len() > 1) {
                assert!(!r.contains(&format!(":{part}")), "{url} -> {r}");
            }
        }
        // `p@ss@host`: the last `@` ends the userinfo, as in a browser.
        assert_eq!(
            redact_url("postgres://u:p@ss@127.0.0.1:1/db"),
            "postgres://u:***@127.0.0.1:1/db"
        );
    }

    #[test]
    fn urls_without_a_password_are_unchanged() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:/tmp/x.db"), "sqlite:/tmp/x.db");
        assert_eq!(redact_url("/var/lib/jobs.db"), "/var/lib/jobs.db");
    }

    #[test]
    fn unparseable_input_becomes_the_placeholder() {
        for url in [
            "postgres://u:secret@[::1/db",
            "redis://u:secret@h:99999/0",
            "u:secret@h",
        ] {
            assert_eq!(redact_url(url), UNPARSEABLE, "{url}");
        }
    }
}
