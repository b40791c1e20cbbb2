"""
Interoperability tests: real command-line and library SMTP clients against
relay + sandbox over loopback TLS. Run with C{make interop}, which installs
the clients first (C{tests/interop/install.sh}); see C{docs/interop.md}.
"""
