// Types for couchtoken.js: links to CouchDB attachments served by couchtoken.

/** Signed links need a token of at least this many characters (Unicode code points). */
export const MIN_SIGNING_TOKEN_LENGTH: 16;

/** Extra query options of a link. */
export interface LinkOptions {
  /** Ask for `Content-Disposition: attachment` (`download=1`). */
  download?: boolean;
}

/**
 * `/<db>/<docId>/<attachment>` as the service parses it (the doc id's `/` as `%2F`,
 * the attachment's `/` kept). Throws RangeError for names the service refuses.
 */
export function downloadPath(db: string, docId: string, attachment: string): string;

/**
 * A link with `?token=`; with a null or omitted token, none (send it with `headerInit`).
 * Throws RangeError for names the service refuses or an empty token.
 */
export function downloadUrl(
  base: string,
  db: string,
  docId: string,
  attachment: string,
  token?: string | null,
  options?: LinkOptions,
): string;

/**
 * An expiring link (`?expires=&sig=`), HMAC-SHA256 keyed with the token, which it does not carry.
 * `expiresAt` is unix seconds or a Date. Rejects (RangeError) tokens shorter than
 * MIN_SIGNING_TOKEN_LENGTH characters and names the service refuses.
 */
export function signedUrl(
  base: string,
  db: string,
  docId: string,
  attachment: string,
  token: string,
  expiresAt: number | Date,
  options?: LinkOptions,
): Promise<string>;

/** A fresh download token: 128 random bits, base64url (22 characters). */
export function newToken(): string;

/**
 * `{headers: {Authorization: "Bearer <token>"}}` for `fetch`, keeping the token out of the URL.
 * Throws RangeError for tokens a header cannot carry unchanged (use `downloadUrl` for those).
 */
export function headerInit(token: string): { headers: { Authorization: string } };
