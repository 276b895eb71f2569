//! Roles and ports from the environment; bad values name the variable and the value.
//! One test function: environment variables are process-wide.

use std::time::Duration;

use shared_tensor::config::{Config, Role};
use shared_tensor::Error;

fn with_env<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let out = f();
    for (k, _) in vars {
        std::env::remove_var(k);
    }
    out
}

fn bad(vars: &[(&str, &str)]) -> (String, String) {
    match with_env(vars, Config::from_env) {
        Err(Error::Config { variable, value, .. }) => (variable, value),
        other => panic!("{vars:?} gave {other:?}"),
    }
}

#[test]
fn roles_ports_and_timeouts_come_from_the_environment() {
    let c = with_env(&[], Config::from_env).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.get_role(), Role::Client);

    let c = with_env(
        &[
            ("SHARED_TENSOR_ROLE", "server"),
            ("SHARED_TENSOR_BASE_PORT", "4000"),
            ("SHARED_TENSOR_DEVICE", "3"),
            ("SHARED_TENSOR_CALL_TIMEOUT_MS", "1500"),
            ("SHARED_TENSOR_CONNECT_TIMEOUT_MS", "0"),
        ],
        Config::from_env,
    )
    .unwrap();
    assert_eq!(c.get_role(), Role::Server);
    assert_eq!(c.port().unwrap(), 4003);
    assert_eq!(
        c,
        Config::default()
            .role(Role::Server)
            .base_port(4000)
            .device_index(3)
            .call_timeout(Duration::from_millis(1500))
            .connect_timeout(Duration::ZERO)
    );
    assert_eq!(with_env(&[("SHARED_TENSOR_ROLE", "local")], Config::from_env).unwrap().get_role(), Role::Local);

    assert_eq!(bad(&[("SHARED_TENSOR_ROLE", "sever")]), ("SHARED_TENSOR_ROLE".into(), "sever".into()));
    assert_eq!(bad(&[("SHARED_TENSOR_BASE_PORT", "70000")]), ("SHARED_TENSOR_BASE_PORT".into(), "70000".into()));
    assert_eq!(bad(&[("SHARED_TENSOR_BASE_PORT", "0")]), ("SHARED_TENSOR_BASE_PORT".into(), "0".into()));
    assert_eq!(bad(&[("SHARED_TENSOR_DEVICE", "gpu0")]), ("SHARED_TENSOR_DEVICE".into(), "gpu0".into()));
    assert_eq!(bad(&[("SHARED_TENSOR_CALL_TIMEOUT_MS", "0")]), ("SHARED_TENSOR_CALL_TIMEOUT_MS".into(), "0".into()));
    let message = with_env(&[("SHARED_TENSOR_BASE_PORT", "x")], Config::from_env).unwrap_err().to_string();
    assert_eq!(message, "SHARED_TENSOR_BASE_PORT=\"x\" is not valid: expected a port number from 1 to 65535");

    use shared_tensor::transport::Transport;
    assert_eq!(c.get_transport(), Transport::Auto, "the default");
    let c = with_env(&[("SHARED_TENSOR_TRANSPORT", "TCP")], Config::from_env).unwrap();
    assert_eq!(c.get_transport(), Transport::Tcp);
    let message = with_env(&[("SHARED_TENSOR_TRANSPORT", "udp")], Config::from_env).unwrap_err().to_string();
    assert_eq!(message, "SHARED_TENSOR_TRANSPORT=\"udp\" is not valid: expected `auto`, `unix` or `tcp`");

    let c = with_env(&[("SHARED_TENSOR_SPIN_US", "250")], Config::from_env).unwrap();
    assert_eq!(c.get_spin(), Duration::from_micros(250));
    let c = with_env(&[("SHARED_TENSOR_SPIN_US", "0")], Config::from_env).unwrap();
    assert_eq!(c.get_spin(), Duration::ZERO, "0 never spins");
    assert_eq!(bad(&[("SHARED_TENSOR_SPIN_US", "-1")]), ("SHARED_TENSOR_SPIN_US".into(), "-1".into()));
    let message = with_env(&[("SHARED_TENSOR_SPIN_US", "1ms")], Config::from_env).unwrap_err().to_string();
    assert_eq!(
        message,
        "SHARED_TENSOR_SPIN_US=\"1ms\" is not valid: expected microseconds from 0 (never spin) to 10000"
    );
    assert_eq!(bad(&[("SHARED_TENSOR_SPIN_US", "20000")]), ("SHARED_TENSOR_SPIN_US".into(), "20000".into()));
    let c = with_env(&[("SHARED_TENSOR_SPIN_US", "10000")], Config::from_env).unwrap();
    assert_eq!(c.get_spin(), Duration::from_millis(10), "the longest window is allowed");
}
