// Links to CouchDB attachments served by couchtoken, for browsers and Node 19+
// (Node 18 with --experimental-global-webcrypto). No dependencies.
//
// Names are encoded exactly as the service parses them, and refused where the
// service would refuse them, with the same rules as the Python helper
// (couchtoken.client), which gives the same URLs. Names are used as given
// (no Unicode normalisation). Errors never quote the token.

/** Signed links need a token of at least this many characters (Unicode code points). */
export const MIN_SIGNING_TOKEN_LENGTH = 16;

const MAX_NAME_BYTES = 4096;
const MAX_EXPIRES = 999999999999; // the service reads at most 12 digits
const DATABASE_NAME = /^[a-z][a-z0-9_$()+/-]*$/;
const CONTROL = /[\x00-\x1f\x7f]/;
const HEADER_TOKEN = /^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/;
const utf8 = new TextEncoder();

// UTF-8 percent-encoding of everything but A-Z a-z 0-9 - . _ ~ (as Python's quote(s, safe="")).
function encodeComponent(text, what) {
  let encoded;
  try {
    encoded = encodeURIComponent(text);
  } catch {
    throw new RangeError(`${what} is not valid Unicode (lone surrogate)`);
  }
  return encoded.replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
}

function checkString(value, what) {
  if (typeof value !== "string") throw new TypeError(`${what} must be a string`);
  return value;
}

// One name (or one attachment segment) as the service's parser checks it.
function checkName(name, what) {
  const encoded = encodeComponent(name, what);
  if (utf8.encode(name).length > MAX_NAME_BYTES) throw new RangeError(`${what} is too long`);
  if (!name) throw new RangeError(`${what} is empty`);
  if (CONTROL.test(name)) throw new RangeError(`${what} holds a control character`);
  if (name.split("/").some((part) => part === "." || part === "..")) {
    throw new RangeError(`${what} holds a '.' or '..' segment`);
  }
  return encoded;
}

/**
 * `/<db>/<docId>/<attachment>` as the service parses it: the doc id's `/` as
 * `%2F`, the attachment's `/` kept (it nests), every other byte but
 * `A-Z a-z 0-9 - . _ ~` percent-encoded as UTF-8.
 */
export function downloadPath(db, docId, attachment) {
  const dbPart = checkName(checkString(db, "the database name"), "the database name");
  const docPart = checkName(checkString(docId, "the document id"), "the document id");
  const attachmentParts = checkString(attachment, "the attachment name")
    .split("/")
    .map((part) => checkName(part, "the attachment name"));
  if (db.startsWith("_") || docId.startsWith("_")) {
    throw new RangeError("system databases and documents are not served");
  }
  if (!DATABASE_NAME.test(db)) throw new RangeError("not a valid CouchDB database name");
  return `/${dbPart}/${docPart}/${attachmentParts.join("/")}`;
}

function checkToken(token) {
  if (!checkString(token, "the token")) throw new RangeError("the token is empty");
  return encodeComponent(token, "the token");
}

function trimBase(base) {
  return checkString(base, "the base URL").replace(/\/+$/, "");
}

/**
 * A link with `?token=` (or, with a null token, none: send it with `headerInit`).
 * `{download: true}` asks for `Content-Disposition: attachment`.
 */
export function downloadUrl(base, db, docId, attachment, token, { download } = {}) {
  const path = downloadPath(db, docId, attachment);
  const query = [];
  if (token !== undefined && token !== null) query.push(`token=${checkToken(token)}`);
  if (download) query.push("download=1");
  return trimBase(base) + path + (query.length ? `?${query.join("&")}` : "");
}

function unixSeconds(expiresAt) {
  const seconds = expiresAt instanceof Date ? Math.floor(expiresAt.getTime() / 1000) : expiresAt;
  if (typeof seconds !== "number" || !Number.isInteger(seconds)) {
    throw new TypeError("expiresAt must be integer unix seconds or a Date");
  }
  if (seconds < 0 || seconds > MAX_EXPIRES) throw new RangeError("expiresAt is out of range");
  return seconds;
}

function webCrypto() {
  const crypto = globalThis.crypto;
  if (!crypto?.subtle) {
    throw new Error(
      "Web Crypto is missing (Node 18 needs --experimental-global-webcrypto; a page needs https)",
    );
  }
  return crypto;
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * An expiring link (`?expires=&sig=`), HMAC-SHA256 keyed with the document's
 * token over `<db>\n<docId>\n<attachment>\n<expires>`; the token is not in it.
 * Refuses tokens shorter than MIN_SIGNING_TOKEN_LENGTH characters.
 */
export async function signedUrl(base, db, docId, attachment, token, expiresAt, { download } = {}) {
  const path = downloadPath(db, docId, attachment);
  checkToken(token);
  if ([...token].length < MIN_SIGNING_TOKEN_LENGTH) {
    const minimum = MIN_SIGNING_TOKEN_LENGTH;
    throw new RangeError(`signing needs a token of at least ${minimum} characters`);
  }
  const expires = unixSeconds(expiresAt);
  const root = trimBase(base);
  const { subtle } = webCrypto();
  const hmac = { name: "HMAC", hash: "SHA-256" };
  const key = await subtle.importKey("raw", utf8.encode(token), hmac, false, ["sign"]);
  const message = utf8.encode(`${db}\n${docId}\n${attachment}\n${expires}`);
  const sig = hex(await subtle.sign("HMAC", key, message));
  return `${root}${path}?expires=${expires}&sig=${sig}${download ? "&download=1" : ""}`;
}

/** A fresh download token: 128 random bits, base64url (22 characters). */
export function newToken() {
  const bytes = webCrypto().getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes))
    .replace(/\+/g, "-")
    .replace(/\//g, "_")
    .replace(/=+$/, "");
}

/**
 * `{headers: {Authorization: "Bearer <token>"}}` for `fetch`: the token stays
 * out of the URL, history and Referer. Refuses tokens a header cannot carry
 * unchanged (non-ASCII, control characters, surrounding spaces).
 */
export function headerInit(token) {
  checkToken(token);
  if (!HEADER_TOKEN.test(token)) {
    throw new RangeError(
      "this token cannot travel in a header; put it in the URL with downloadUrl",
    );
  }
  return { headers: { Authorization: `Bearer ${token}` } };
}
