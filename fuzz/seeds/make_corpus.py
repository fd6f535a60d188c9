#!/usr/bin/env python3
"""Writes fuzz/corpus/<target>/ from the repository's own inputs: the example policies, the
routing documentation's HTTPRoute, the JWT test fixture key, the e2e tests' grpc-timeout and
tokens signed the way the tests sign them. Needs PyYAML and the openssl CLI (for the EC, Ed25519
and certificate seeds). Re-run after changing a format; files are named by content."""
import base64, glob, hashlib, hmac, json, os, re, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "fuzz", "corpus")
import yaml


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


HS_SECRET = b"trellis-fuzz-hs256-secret-0123456789abcdef"


def hs_token(header, payload):
    m = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = hmac.new(HS_SECRET, m.encode(), hashlib.sha256).digest()
    return m + "." + b64(sig)


def openssl(*args, input=None):
    return subprocess.run(["openssl", *args], check=True, capture_output=True, input=input).stdout


# --- jwt ---
good = {"iss": "https://hs.test", "sub": "alice", "aud": "api", "exp": 4102444800,
        "nbf": 1, "scope": "read write", "tenant": "acme"}
for header, payload in [
    ({"alg": "HS256", "kid": "hs"}, good),
    ({"alg": "HS256"}, dict(good, aud=["x", "api"], scp=["a", "b"])),
    ({"alg": "HS256", "kid": "hs"}, dict(good, exp=1)),
    ({"alg": "HS256", "kid": "hs"}, dict(good, aud="other")),
    ({"alg": "HS256", "kid": "hs"}, dict(good, nbf=4102444800)),
    ({"alg": "HS256", "kid": "hs", "crit": ["b64"]}, good),
    ({"alg": "none"}, good),
    ({"alg": "HS256", "kid": "nope"}, dict(good, tenant={"a": [1, 2.5, None]})),
    ({"alg": "HS256", "kid": "hs"}, {"iss": "https://hs.test", "exp": "soon"}),
]:
    put("jwt", b"\x01" + json.dumps(header).encode() + b"\0" + json.dumps(payload).encode())
    put("jwt", b"\x00Bearer " + hs_token(header, payload).encode())
rsa = {"iss": "https://rsa.test", "exp": 4102444800}
unsigned = b64(b'{"alg":"RS256","kid":"rsa-test"}') + "." + b64(json.dumps(rsa).encode())
put("jwt", "\x02/?access_token=" + unsigned + "." + "A" * 342)
put("jwt", "\x00bearer " + unsigned + ".")
put("jwt", "\x00Bearer a.b.c.d")
put("jwt", "\x00Bearer " + b64(b'{"alg":"ES256"}') + ".e30.AAAA")

# --- jwks ---
fixture = json.load(open(os.path.join(ROOT, "proxy/tests/fixtures/jwt_rsa_test_key.jwk.json")))
with tempfile.TemporaryDirectory() as tmp:
    ec = openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout")
    ec_der = openssl("ec", "-pubout", "-outform", "DER", input=ec)
    point = ec_der[-65:]
    ed = openssl("genpkey", "-algorithm", "ed25519")
    ed_der = openssl("pkey", "-pubout", "-outform", "DER", input=ed)
    # Certificates with SPIFFE URI SANs (one, two, none).
    certs = []
    for san in ["URI:spiffe://trellis.local/service/orders",
                "URI:spiffe://trellis.local/service/a,URI:spiffe://trellis.local/service/b",
                "DNS:orders.example"]:
        key = os.path.join(tmp, "k.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-subj", "/CN=t",
                        "-days", "1", "-addext", "subjectAltName=" + san, "-outform", "DER",
                        "-out", os.path.join(tmp, "c.der")], check=True, capture_output=True)
        certs.append(open(os.path.join(tmp, "c.der"), "rb").read())
ec_jwk = {"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
          "x": b64(point[1:33]), "y": b64(point[33:65])}
ed_jwk = {"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": b64(ed_der[-32:])}
oct_jwk = {"kty": "oct", "kid": "k1", "alg": "HS256", "k": b64(HS_SECRET)}
for keys in [[fixture], [ec_jwk], [ed_jwk], [oct_jwk], [fixture, ec_jwk, ed_jwk, oct_jwk],
             [dict(fixture, use="enc"), dict(oct_jwk, kid=None)],
             [dict(ec_jwk, alg="RS256")], [dict(fixture, e="AQ")], []]:
    put("jwks", json.dumps({"keys": keys}))
put("jwks", "{\"keys\": 5}")

# --- policy and etcd: the example policies and mesh files ---
docs = []
for path in sorted(glob.glob(os.path.join(ROOT, "examples/*/*.yaml"))):
    text = open(path).read()
    if "apiVersion: trellis.dev/v1" in text or "services:" in text:
        put("policy", text)
    if "apiVersion: trellis.dev/v1" in text:
        docs += [d for d in yaml.safe_load_all(text) if d]
routing_md = open(os.path.join(ROOT, "docs/routing.md")).read()
for block in re.findall(r"```yaml\n(.*?)```", routing_md, re.S):
    put("policy", block)
    docs += [d for d in yaml.safe_load_all(block) if isinstance(d, dict) and "kind" in d]
for path in sorted(glob.glob(os.path.join(ROOT, "docs/*.md"))):
    for block in re.findall(r"```yaml\n(.*?)```", open(path).read(), re.S):
        if "apiVersion: trellis.dev/v1" in block:
            put("policy", block)
reg = {"service": "orders", "instance": "o-1", "address": "127.0.0.1:15006",
       "identity": "spiffe://trellis.local/service/orders"}
put("etcd", "services/orders/instances/o-1\0" + json.dumps(reg))
pairs = [("services/orders/instances/o-1", json.dumps(reg)),
         ("services/users/instances/u-1", json.dumps(dict(reg, service="users", instance="u-1",
                                                           identity="spiffe://trellis.local/service/users",
                                                           address="127.0.0.1:15007")))]
for d in docs:
    name = d.get("metadata", {}).get("name", "x")
    pairs.append((f"policies/{d['kind']}/{name}", json.dumps(d, default=str)))
for i in range(0, len(pairs), 3):
    put("etcd", "\0".join(k + "\0" + v for k, v in pairs[i:i + 3]))
put("etcd", "\0".join(k + "\0" + v for k, v in pairs))
put("etcd", "/trellis/v1/mesh/policies/ServicePolicy/orders\0{\"apiVersion\":\"trellis.dev/v1\"}")

# --- spiffe ---
for s in ["spiffe://trellis.local/service/orders", "spiffe://example.org/ns/default/sa/x",
          "spiffe://trellis.local", "spiffe://TD/service/a", "spiffe://td/service/a/b",
          "spiffe://td/../x", "http://td/service/a", "spiffe://td:443/service/a"]:
    put("spiffe", b"\x00" + s.encode())
for c in certs:
    put("spiffe", b"\x01" + c)

# --- routing ---
requests = "\0GET /api/x\nx-beta: true\0GET /api/orders?id=1\0POST /admin\0GET /reports/2024?q=1\0GET http://orders/api\0DELETE /\nhost: Orders"
for d in docs:
    if d.get("kind") == "HTTPRoute":
        put("routing", yaml.safe_dump(d["spec"]) + requests)
put("routing", "hosts: [orders, \"*.example.com\"]\nrules:\n- matches: [{path: {regex: '/re/[0-9]+'}, headers: [{name: x-a, present: true}], query: [{name: q, exact: '1'}]}]\n  backends: [{service: users}]\n  rewrite: {path: /new, host: 'users:8080'}\n- matches: [{path: {prefix: /p/}}]\n  backends: [{service: orders}]\n  rewrite: {path_prefix: /}\n" + requests + "\0GET /re/12?q=1\nx-a: y\nhost: a.example.com\0GET /p/x/y")
put("routing", "hosts: [users]\nrules:\n- redirect: {scheme: https, port: 8443, path: /moved, status: 308}\n\0GET /anything?x=1\nhost: users")

# --- json_body ---
for b in ['{"a": 3, "b": "ab", "c": [1, 2], "d": {"k": [1, 2.0]}, "e": [1, 2.5], "f": null}',
          '{"a": 0, "b": "A", "a": "x", "\\u0061b": "\\ud83e\\udd80", "i": {"x": true, "y": 1}}',
          '{"customer": "ada@example.com", "currency": "EUR", "placed": "2026-12-03T20:00:00Z", "lines": [{"sku": "ABC-0001", "qty": 1, "price": 9.99}]}',
          '[[[1, 18446744073709551616, -0, 1e-400]], {"l": {"v": 1, "next": {"v": "x"}}}]',
          '{"customer": "\xff\xfe"}', '{"a": 1,}', '[' * 130 + ']' * 130, '"\\u00e9"']:
    put("json_body", b.encode("latin-1") if "\xff" in b else b)

# --- grpc_timeout ---
for v in ["300m", "1H", "99999999S", "100000000n", "5u", "0m", "+5m", "1 S", "H", "", "12x", "1" * 30]:
    put("grpc_timeout", v)

# --- ratelimit ---
put("ratelimit", "{\"client_identity\":true,\"source_ip\":true,\"headers\":[\"x-tenant\"],\"consumer\":true}\0x-tenant: acme\nx-user: 1\0spiffe://trellis.local/service/a\0acme\0a\n{\"policies\":{\"p\":{\"00000000000000ff\":10,\"0000000000000001\":2.5}}}\0b\n{\"policies\":{\"p\":{\"00000000000000ff\":90}}}")
put("ratelimit", "\x0f\0x-tenant: t\0\0\0a\n{\"policies\":{\"p\":{}}}\0b\n{\"policies\":{\"p\":{\"ff\":-1}}}\0c\n{\"policies\":{\"q\":{\"ff\":1}}}")

# --- protocol ---
for p in ["GET / HTTP/1.1\r\nhost: orders\r\nconnection: keep-alive, x-a\r\nx-a: 1\r\n\r\n",
          "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
          "PO", "CONNECT orders:443 HTTP/1.1\nhost: [::1]:443\nupgrade: websocket\nconnection: upgrade\nte: trailers",
          "SSH-2.0-OpenSSH_9.6\r\n"]:
    put("protocol", p)
# --- openapi: two versions of one API (every breaking change kind), a $ref'd response, a cycle,
# Swagger 2.0 ---
V1 = {"openapi": "3.1.0", "info": {"title": "Orders API", "version": "1.0.0"},
      "paths": {"/orders": {"get": {"parameters": [{"name": "limit", "in": "query"}],
                                    "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}}}}}}},
                            "post": {"requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["item"], "properties": {"item": {"type": "string"}}}}}}, "responses": {"201": {"description": "created"}}}},
                "/orders/{id}": {"delete": {"responses": {"204": {"description": "deleted"}}}}},
      "components": {"schemas": {"Order": {"type": "object", "properties": {"id": {"type": "string"}, "note": {"type": "string"}, "parent": {"$ref": "#/components/schemas/Order"}}}}}}
V2 = json.loads(json.dumps(V1))
V2["paths"]["/orders/{id}"] = {"get": {"responses": {"200": {"description": "ok"}}}}
V2["paths"]["/orders"]["get"]["parameters"] = [{"name": "tenant", "in": "query", "required": True}]
del V2["components"]["schemas"]["Order"]["properties"]["note"]
put("openapi", json.dumps(V1) + "\0" + json.dumps(V2))
put("openapi", "openapi: 3.0.3\ninfo: {title: t, version: '1'}\npaths:\n  /a:\n    get:\n      responses:\n        '200': {$ref: '#/components/responses/R'}\ncomponents:\n  responses:\n    R: {description: ok}\n\0openapi: 3.1.0\ninfo: {title: t, version: '2'}\n")
put("openapi", "openapi: 3.1.0\ninfo: {title: t, version: '1'}\ncomponents:\n  schemas:\n    A: {$ref: '#/components/schemas/B'}\n    B: {$ref: '#/components/schemas/A'}\n")
put("openapi", "{\"openapi\": \"2.0\", \"info\": {}}")
# --- transcode: JSON requests to the test gRPC service of tests/proto/transcode.proto ---
for r in ["GET /v1/shelves/3/items/42?title=hi%21&tags=a&tags=b&draft=true&meta.pages=3\n",
          "POST /v1/shelves/1/items\n{\"title\": \"t\", \"created\": \"2026-12-03T10:00:00Z\", \"ttl\": \"2s\", \"kind\": \"BOOK\", \"data\": \"aGk=\", \"count\": 3, \"big\": \"18446744073709551615\"}",
          "PATCH /v1/items/9/meta\n{\"author\": \"ana\", \"pages\": 12}",
          "GET /v1/items/5:stream\n", "GET /v1/missing/1\n", "GET /v1/items/a%2Fb%20c?count=0&created=1970-01-01T00:00:01Z\n",
          "POST /test.Echo/Plain\n{\"meta\": {\"pages\": \"many\"}, \"nope\": [1, {}]}",
          "POST /test.Echo/Plain\n[1, 2]", "GET /v1/shelves/%ff/items/1\n",
          # Client streams: a JSON array of messages, split as it streams.
          "POST /v1/shelves/1/items:collect\n[{\"id\": 1, \"tags\": [\"a,]\"]}, {\"title\": \"\\\"}\"}]",
          "POST /test.Echo/Chat\n [ ] ", "POST /v1/shelves/1/items:collect\n[{\"nope\": 1}, {},]",
          "POST /test.Echo/Chat\n[[[{}]], 1 2]"]:
    put("transcode", r)
print("corpus written to", OUT)

# --- inject: the injection tests' manifests (every workload kind, a List in JSON, YAML 1.1
# quirks), the example app, and an injected one.
for path in sorted(glob.glob(os.path.join(ROOT, "mesh-agent/tests/inject_data/*.*"))
                   + [os.path.join(ROOT, "examples/kubernetes/inject/app.yaml"),
                      os.path.join(ROOT, "mesh-agent/tests/inject_data/golden/statefulset.yaml")]):
    with open(path, "rb") as f:
        put("inject", f.read())
