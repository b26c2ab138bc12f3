// The module on its own: encoding, signatures, refusals. No service needed.
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { test } from "node:test";

import {
  MIN_SIGNING_TOKEN_LENGTH,
  downloadPath,
  downloadUrl,
  headerInit,
  newToken,
  signedUrl,
} from "../couchtoken.js";

const TOKEN = "0123456789abcdef-token";

test("a doc id's slash is %2F, an attachment's slash stays, the rest is percent-encoded", () => {
  assert.equal(
    downloadUrl("https://files.example/", "db", "user/42", "photos/a+b c é?#.png", "t+k n"),
    "https://files.example/db/user%2F42/photos/a%2Bb%20c%20%C3%A9%3F%23.png?token=t%2Bk%20n",
  );
});

test("only A-Z a-z 0-9 - . _ ~ stay unencoded, as Python's quote", () => {
  assert.equal(downloadPath("db", "d", "!*'()~-._%"), "/db/d/%21%2A%27%28%29~-._%25");
  assert.equal(downloadPath("a$b(c)+d/e_f-g", "d", "f"), "/a%24b%28c%29%2Bd%2Fe_f-g/d/f");
});

test("names are kept as given: NFC and NFD are different names", () => {
  assert.equal(downloadPath("db", "caf\u00e9", "x"), "/db/caf%C3%A9/x");
  assert.equal(downloadPath("db", "cafe\u0301", "x"), "/db/cafe%CC%81/x");
  assert.equal(downloadPath("db", "d", "\u{1F600}"), "/db/d/%F0%9F%98%80");
});

test("no token gives no query; download=1 asks for an attachment disposition", () => {
  assert.equal(downloadUrl("http://h", "db", "d", "f"), "http://h/db/d/f");
  const download = { download: true };
  const link = (token) => downloadUrl("http://h", "db", "d", "f", token, download);
  assert.equal(link(null), "http://h/db/d/f?download=1");
  assert.equal(link("t"), "http://h/db/d/f?token=t&download=1");
  assert.equal(downloadUrl("", "db", "d", "f"), "/db/d/f");
});

test("names the service refuses are refused", () => {
  const refused = [
    ["Db", "d", "f"],
    ["_users", "d", "f"],
    ["db", "_design/x", "f"],
    ["db", "", "f"],
    ["db", "d", ""],
    ["db", "d", "a//b"],
    ["db", "d", "a/"],
    ["db", "d", "a/../b"],
    ["db", ".", "f"],
    ["db", "a/../b", "f"],
    ["db", "d", "tab\there"],
    ["db", "d\x7f", "f"],
    ["db", "d", "\ud800"],
    ["db", "x".repeat(4097), "f"],
    ["db", "é".repeat(2049), "f"],
  ];
  for (const names of refused) {
    assert.throws(() => downloadPath(...names), RangeError, JSON.stringify(names));
  }
  assert.equal(downloadPath("db", "x".repeat(4096), "..."), `/db/${"x".repeat(4096)}/...`);
  assert.throws(() => downloadPath("db", 42, "f"), TypeError);
});

test("empty tokens and tokens that are not Unicode are refused", () => {
  assert.throws(() => downloadUrl("http://h", "db", "d", "f", ""), RangeError);
  assert.throws(() => downloadUrl("http://h", "db", "d", "f", "\udc00"), RangeError);
  assert.throws(() => downloadUrl("http://h", "db", "d", "f", 7), TypeError);
});

test("a signed link is HMAC-SHA256 of the names and expiry, keyed with the token", async () => {
  const token = "k\u00e9y-0123456789abcdef";
  const url = await signedUrl("https://h/", "db", "d/1", "a b/\u00e9.txt", token, 1700000000);
  const expected = createHmac("sha256", Buffer.from(token, "utf8"))
    .update(Buffer.from("db\nd/1\na b/\u00e9.txt\n1700000000", "utf8"))
    .digest("hex");
  assert.equal(url, `https://h/db/d%2F1/a%20b/%C3%A9.txt?expires=1700000000&sig=${expected}`);
  assert.ok(!url.includes("token"));
  const moment = new Date(1700000000999);
  const dated = await signedUrl("https://h", "db", "d/1", "a b/\u00e9.txt", token, moment);
  assert.equal(dated, url);
  const download = await signedUrl("https://h", "db", "d", "f", TOKEN, 1, { download: true });
  assert.match(download, /^https:\/\/h\/db\/d\/f\?expires=1&sig=[0-9a-f]{64}&download=1$/);
});

test(`signing needs a token of ${MIN_SIGNING_TOKEN_LENGTH} characters or more`, async () => {
  assert.equal(MIN_SIGNING_TOKEN_LENGTH, 16);
  await assert.rejects(signedUrl("http://h", "db", "d", "f", "x".repeat(15), 1), RangeError);
  await signedUrl("http://h", "db", "d", "f", "x".repeat(16), 1);
  // Characters, not UTF-16 units: 15 emoji are 30 units but still too short.
  const emoji = "\u{1F600}".repeat(15);
  await assert.rejects(signedUrl("http://h", "db", "d", "f", emoji, 1), RangeError);
  await assert.rejects(signedUrl("http://h", "db", "d", "f", "", 1), RangeError);
  await assert.rejects(signedUrl("http://h", "db", "d", "f", "\ud800".repeat(16), 1), RangeError);
});

test("the error never quotes the token", async () => {
  const secret = "secret-but-short";
  for (const attempt of [
    () => signedUrl("http://h", "db", "d", "f", secret.slice(0, 15), 1),
    () => signedUrl("http://h", "db", "d", "f", secret, -1),
    async () => headerInit(` ${secret}`),
  ]) {
    await assert.rejects(attempt, (error) => !String(error.message).includes(secret.slice(0, 15)));
  }
});

test("expiry must be whole unix seconds the service can read", async () => {
  for (const bad of [-1, 1.5, 1e12, "1700000000", NaN, null]) {
    await assert.rejects(signedUrl("http://h", "db", "d", "f", TOKEN, bad), String(bad));
  }
  await signedUrl("http://h", "db", "d", "f", TOKEN, 999999999999);
});

test("newToken() is 128 random bits in base64url", () => {
  const tokens = new Set(Array.from({ length: 1000 }, newToken));
  assert.equal(tokens.size, 1000);
  for (const token of tokens) {
    assert.match(token, /^[A-Za-z0-9_-]{22}$/);
    assert.equal(Buffer.from(token, "base64url").length, 16);
  }
  assert.ok(newToken().length >= MIN_SIGNING_TOKEN_LENGTH);
});

test("headerInit() puts the token in a Bearer header", () => {
  assert.deepEqual(headerInit(TOKEN), { headers: { Authorization: `Bearer ${TOKEN}` } });
  assert.deepEqual(headerInit("a b"), { headers: { Authorization: "Bearer a b" } });
  for (const bad of ["", " padded", "padded ", "caf\u00e9", "line\nbreak", "nul\x00"]) {
    assert.throws(() => headerInit(bad), RangeError, JSON.stringify(bad));
  }
});
