// Calls clients/js/couchtoken.js for tests/clients/test_js_client.py, one JSON line per call:
//   in:  {"fn": "downloadUrl", "args": [...]}
//   out: {"value": ...} or {"error": "RangeError"}
import { createInterface } from "node:readline";

import * as couchtoken from "../../clients/js/couchtoken.js";

for await (const line of createInterface({ input: process.stdin })) {
  const { fn, args } = JSON.parse(line);
  let reply;
  try {
    reply = { value: await couchtoken[fn](...args) };
  } catch (error) {
    reply = { error: error.name, message: error.message };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
