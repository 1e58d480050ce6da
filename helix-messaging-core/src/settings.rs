//! Reading settings from variables: the shapes every adapter's `from_vars` shares.

use std::fmt;

use crate::error::Error;

/// One variable of a pair set without the other ([`paired_files`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpaired {
    /// The variable that is not set.
    pub missing: &'static str,
    /// The one that is.
    pub present: &'static str,
}

impl fmt::Display for Unpaired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not set, while {} is: a certificate and its key go together",
            self.present
        )
    }
}

impl From<Unpaired> for Error {
    /// An [`ErrorKind::Config`](crate::ErrorKind::Config) error naming the missing variable.
    fn from(unpaired: Unpaired) -> Self {
        Error::config(unpaired.missing, unpaired)
    }
}

/// A certificate file and its key file, named by the variables `cert_var` and `key_var`
/// and read through `var`: `None` when neither is set, both (trimmed) when both are.
///
/// # Errors
/// [`Unpaired`] naming the missing variable when only one is set (a certificate without
/// its key, or a key without its certificate, is a mistake, never half a configuration).
pub fn paired_files(
    var: impl Fn(&str) -> Option<String>,
    cert_var: &'static str,
    key_var: &'static str,
) -> Result<Option<(String, String)>, Unpaired> {
    match (var(cert_var), var(key_var)) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some((cert.trim().to_owned(), key.trim().to_owned()))),
        (Some(_), None) => Err(Unpaired {
            missing: key_var,
            present: cert_var,
        }),
        (None, Some(_)) => Err(Unpaired {
            missing: cert_var,
            present: key_var,
        }),
    }
}

/// One server address as the settings write it: `host`, `host:port`, `[v6]` or
/// `[v6]:port`, with `default_port` where none is given. An IPv6 address goes in brackets:
/// unbracketed, its colons cannot be told from the port's.
///
/// # Errors
/// What is wrong with `address`, for the caller's error naming its variable: no host, a
/// port that is not a number, an IPv6 address without brackets, without its closing
/// bracket or with text after it.
pub fn host_and_port(address: &str, default_port: u16) -> Result<(String, u16), &'static str> {
    let port_of = |port: &str| port.parse().map_err(|_| "the port is not a number");
    let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
        // Connected to without the brackets.
        let (host, rest) = bracketed
            .split_once(']')
            .ok_or("an IPv6 address without its closing bracket")?;
        match rest.strip_prefix(':') {
            Some(port) => (host, port_of(port)?),
            None if rest.is_empty() => (host, default_port),
            None => return Err("text after the IPv6 address"),
        }
    } else if address.matches(':').count() > 1 {
        return Err("an IPv6 address goes in brackets, as [::1]:port");
    } else {
        match address.rsplit_once(':') {
            Some((host, port)) => (host, port_of(port)?),
            None => (address, default_port),
        }
    };
    if host.is_empty() {
        return Err("no host");
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(set: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let set: Vec<(String, String)> = set
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| set.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn addresses_are_read_with_or_without_a_port_and_ipv6_in_brackets() {
        for (address, read) in [
            ("node", ("node", 5672)),
            ("node:5680", ("node", 5680)),
            ("[::1]:5680", ("::1", 5680)),
            ("[fd00::2]", ("fd00::2", 5672)),
        ] {
            assert_eq!(
                host_and_port(address, 5672),
                Ok((read.0.to_owned(), read.1)),
                "{address}"
            );
        }
        for (wrong, why) in [
            ("node:port", "the port is not a number"),
            ("fd00::2", "an IPv6 address goes in brackets, as [::1]:port"),
            ("[::1", "an IPv6 address without its closing bracket"),
            ("[::1]x", "text after the IPv6 address"),
            (":5672", "no host"),
        ] {
            assert_eq!(host_and_port(wrong, 5672), Err(why), "{wrong}");
        }
    }

    #[test]
    fn both_or_neither_and_the_missing_one_is_named() {
        assert_eq!(paired_files(vars(&[]), "C", "K"), Ok(None));
        assert_eq!(
            paired_files(vars(&[("C", " c.pem\n"), ("K", "k.pem")]), "C", "K"),
            Ok(Some(("c.pem".into(), "k.pem".into())))
        );
        let err = Error::from(paired_files(vars(&[("C", "c.pem")]), "C", "K").unwrap_err());
        assert_eq!(err.kind(), crate::ErrorKind::Config);
        assert!(err.message().starts_with("K: not set, while C is"), "{err}");
        let unpaired = paired_files(vars(&[("K", "k.pem")]), "C", "K").unwrap_err();
        assert_eq!((unpaired.missing, unpaired.present), ("C", "K"));
    }
}
