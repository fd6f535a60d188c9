"""Open N keep-alive HTTP/1.1 connections to 127.0.0.1:PORT, send one request on each and read
its answer, print "ready", then hold them open until stdin closes (bench/run.sh measures the
proxy's RSS meanwhile). Usage: python3 hold_conns.py PORT N HOST"""
import socket
import sys

port, count, host = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
conns = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(request)
    conns.append(s)
for s in conns:
    data = b""
    while not data.endswith(b"ok\n"):
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"connection closed before the answer: {data[:200]!r}")
        data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        sys.exit(f"unexpected answer: {data[:200]!r}")
print("ready", flush=True)
sys.stdin.read()
