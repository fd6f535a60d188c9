// gRPC-Web calls with the npm `grpc-web` client library (the one browsers use), run under node
// by compose::grpc_web_from_the_npm_client (tests/tests/e2e/compose.rs); XMLHttpRequest from
// `xhr2`. Messages are raw bytes (no generated code): the echo service answers what it gets.
//
// node call.js BASE_URL FORMAT(text|binary) -> one JSON line per call on stdout.
global.XMLHttpRequest = require("xhr2");
const grpcWeb = require("grpc-web");

const [base, format] = process.argv.slice(2);
const client = new grpcWeb.GrpcWebClientBase({ format });
const bytes = (b) => b;
const method = (name, type) =>
  new grpcWeb.MethodDescriptor(`/test.Echo/${name}`, type, Object, Object, bytes, bytes);
// protobuf field 1 = "abc"
const request = Uint8Array.from([0x0a, 0x03, 0x61, 0x62, 0x63]);
const hex = (b) => Buffer.from(b).toString("hex");

function unary(name) {
  return new Promise((resolve) => {
    client.rpcCall(`${base}/test.Echo/${name}`, request, {}, method(name, grpcWeb.MethodType.UNARY),
      (err, resp) => resolve(err ? { call: name, code: err.code, message: err.message }
        : { call: name, code: 0, message: hex(resp) }));
  });
}

function stream(name) {
  return new Promise((resolve) => {
    const got = [];
    const s = client.serverStreaming(`${base}/test.Echo/${name}`, request, {},
      method(name, grpcWeb.MethodType.SERVER_STREAMING));
    s.on("data", (m) => got.push(hex(m)));
    s.on("error", (e) => resolve({ call: name, code: e.code, message: e.message, messages: got }));
    s.on("end", () => resolve({ call: name, code: 0, messages: got }));
  });
}

(async () => {
  for (const r of [await unary("Say"), await unary("Fail"), await stream("Repeat")]) {
    console.log(JSON.stringify(r));
  }
})();
