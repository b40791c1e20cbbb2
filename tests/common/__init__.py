"""
The tests' one shared helper package. Test modules import helpers from
here (and from L{poststack_relay.testing}, the public test kit), never from
another test module; C{tests/test_architecture.py} keeps that rule.

One module per subject, imported by its own name (C{from
tests.common.processes import free_port}): one path per helper, and a test
that needs a free port does not load the nodemailer runner.

  - L{keys}: the sandbox's credentials, the forms a secret could leak in and
    the text of a log event to look for them in.
  - L{processes}: the tree's root, C{twistd}, the sandbox data; free ports,
    bounded waits for a port, bounded stops by PID; L{processes.run_tool},
    the one runner of child programs from the reactor (interop clients,
    Postfix's commands, the nodemailer scripts).
  - L{systemd}: an C{sd_notify} receiver and a socket-activation launcher.
  - L{tls}: a test PKI written to files, permissive TLS clients, in-memory
    handshakes.
  - L{haproxy}: Debian's HAProxy (one relay, or a fleet round-robin), started
    and stopped by PID.
  - L{relay}: L{relay.RelayTestCase}, sandbox + relay over real HTTP and
    loopback TLS in the test's reactor.
  - L{smtp}: the in-memory SMTP harnesses (a StringTransport, a Clock, the
    in-memory API) and the replies the SMTP tests expect.
  - L{api}: builders for the API client's tests.
  - L{corpus}: the MIME corpus and the request each file must become.
  - L{node}: the pinned nodemailer scripts of C{tests/e2e/node/}.
  - L{interop}: L{interop.InteropTestCase} (real clients against relay +
    sandbox) and finding the clients.
  - L{postfix}: private Postfix instances for the interop tests.
  - L{fleet}: a fleet on loopback: the sandbox, relay processes and HAProxy
    round-robin with C{send-proxy-v2}, and a client that retries as MTAs do.
  - L{redis}: a real C{redis-server} on loopback, stopped, paused (SIGSTOP),
    resumed and restarted by its PID.
"""
