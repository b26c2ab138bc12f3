// The module against a running couchtoken and its CouchDB (or PouchDB Server).
//
// tests/clients/test_js_client.py starts both, seeds the documents and passes
// a JSON fixture file in COUCHTOKEN_JS_FIXTURE:
//   {base, db, token, couchdb: {url, authorization}, files: [{docId, attachment, base64}]}
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import { downloadUrl, headerInit, newToken, signedUrl } from "../couchtoken.js";

const fixturePath = process.env.COUCHTOKEN_JS_FIXTURE;
const fixture = fixturePath ? JSON.parse(readFileSync(fixturePath, "utf8")) : null;
const skip = fixture ? false : "needs a running service: tests/clients/test_js_client.py runs it";

const nowSeconds = () => Math.floor(Date.now() / 1000);
// Links to a stored file {docId, attachment}, in the fixture's service and database.
const link = (file, token, options) =>
  downloadUrl(fixture.base, fixture.db, file.docId, file.attachment, token, options);
const signed = (file, token, expiresAt) =>
  signedUrl(fixture.base, fixture.db, file.docId, file.attachment, token, expiresAt);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function get(url, init) {
  const response = await fetch(url, init);
  const body = Buffer.from(await response.arrayBuffer());
  return { status: response.status, headers: response.headers, body };
}

async function reason(url) {
  const reply = await get(url);
  return [reply.status, reply.status === 403 ? JSON.parse(reply.body).reason : null];
}

// Fetch until `done(reply)`, for at most `seconds`; returns the last reply.
async function until(url, done, seconds) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const reply = await get(url);
    if (done(reply) || Date.now() > deadline) return reply;
    await sleep(100);
  }
}

// Store a document straight in CouchDB, as an app (or PouchDB replication) would.
async function putDocument(docId, fields) {
  const { url: couchdb, authorization } = fixture.couchdb;
  const url = `${couchdb}/${encodeURIComponent(fixture.db)}/${encodeURIComponent(docId)}`;
  const headers = { "Content-Type": "application/json" };
  if (authorization) headers.Authorization = authorization;
  const current = await fetch(url, { headers });
  const previous = current.ok ? await current.json() : {};
  if (!current.ok) await current.arrayBuffer();
  const _attachments = fields._attachments ?? previous._attachments;
  const doc = { ...fields, _rev: previous._rev, _attachments };
  const response = await fetch(url, { method: "PUT", headers, body: JSON.stringify(doc) });
  assert.equal(response.status, 201, await response.text());
}

describe("against the service", { skip }, () => {
  test("awkward names download byte-exact with ?token=", async () => {
    for (const file of fixture.files) {
      const url = link(file, fixture.token);
      const reply = await get(url);
      assert.equal(reply.status, 200, `${url} -> ${reply.status}`);
      assert.equal(reply.body.toString("base64"), file.base64, url);
    }
  });

  test("awkward names download byte-exact with the token in a header, not the URL", async () => {
    for (const file of fixture.files) {
      const url = link(file);
      assert.ok(!url.includes(fixture.token));
      const reply = await get(url, headerInit(fixture.token));
      assert.equal(reply.status, 200, url);
      assert.equal(reply.body.toString("base64"), file.base64, url);
      assert.equal((await get(url)).status, 403, "without the header");
    }
  });

  test("{download: true} asks for an attachment disposition", async () => {
    const [file] = fixture.files;
    const reply = await get(link(file, fixture.token, { download: true }));
    assert.equal(reply.status, 200);
    assert.match(reply.headers.get("content-disposition"), /^attachment;/);
  });

  test("signed links to awkward names open, and carry no token", async () => {
    for (const file of fixture.files) {
      const url = await signed(file, fixture.token, nowSeconds() + 60);
      assert.ok(!url.includes(fixture.token) && !url.includes("token="));
      const reply = await get(url);
      assert.equal(reply.status, 200, url);
      assert.equal(reply.body.toString("base64"), file.base64, url);
    }
  });

  test("a signed link expires", async () => {
    const [file] = fixture.files;
    const expiresAt = new Date((nowSeconds() + 2) * 1000);
    const url = await signed(file, fixture.token, expiresAt);
    assert.equal((await get(url)).status, 200);
    const later = await until(url, (reply) => reply.status !== 200, 10);
    assert.deepEqual([later.status, JSON.parse(later.body).reason], [403, "expired"]);
    const past = await signed(file, fixture.token, nowSeconds() - 1);
    assert.deepEqual(await reason(past), [403, "expired"]);
  });

  test("a signed link for another file, or from a wrong token, is refused", async () => {
    const [first, second] = fixture.files;
    const expires = nowSeconds() + 60;
    const url = await signed(first, fixture.token, expires);
    const query = url.slice(url.indexOf("?"));
    assert.deepEqual(await reason(link(second) + query), [403, "bad signature"]);
    const guessed = await signed(first, newToken(), expires);
    assert.deepEqual(await reason(guessed), [403, "bad signature"]);
  });

  test("newToken() tokens work, and rotating them kills the old signed links", async () => {
    const file = { docId: "rotating/é +?#", attachment: "nested/dir/new token.bin" };
    const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => 255 - i));
    const first = newToken();
    const data = bytes.toString("base64");
    await putDocument(file.docId, {
      download_token: first,
      _attachments: { [file.attachment]: { content_type: "application/octet-stream", data } },
    });
    const byQuery = await get(link(file, first));
    assert.equal(byQuery.status, 200);
    assert.ok(byQuery.body.equals(bytes));
    assert.ok((await get(link(file), headerInit(first))).body.equals(bytes));
    const signedWithFirst = await signed(file, first, nowSeconds() + 300);
    assert.ok((await get(signedWithFirst)).body.equals(bytes));

    // Both tokens open it while the app moves over...
    const second = newToken();
    await putDocument(file.docId, { download_token: [first, second] });
    assert.equal((await get(signedWithFirst)).status, 200);
    const signedWithSecond = await signed(file, second, nowSeconds() + 300);
    const opened = await until(signedWithSecond, (reply) => reply.status === 200, 5);
    assert.equal(opened.status, 200);

    // ...then the first is retired, and every link signed with it dies.
    await putDocument(file.docId, { download_token: second });
    const dead = await until(signedWithFirst, (reply) => reply.status !== 200, 5);
    assert.deepEqual([dead.status, JSON.parse(dead.body).reason], [403, "bad signature"]);
    assert.equal((await get(link(file, first))).status, 403);
    assert.ok((await get(signedWithSecond)).body.equals(bytes));
  });
});
