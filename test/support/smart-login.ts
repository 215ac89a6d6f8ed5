import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';

/**
 * A SMART app's user, driven over HTTP as a browser would (cookies, redirects, form posts): used by
 * test/smart-launch.test.ts and by tests that need a person's access token (test/leak.test.ts).
 * The real-browser run is test/browser-login.test.ts.
 */

export function pkce(): { verifier: string; challenge: string } {
  const verifier = randomBytes(32).toString('base64url');
  return { verifier, challenge: createHash('sha256').update(verifier).digest('base64url') };
}

/** A browser: a cookie jar, redirects followed one by one (so we see where they go). */
export class Browser {
  private readonly cookies = new Map<string, string>();
  constructor(private readonly origin: string) {}

  async fetch(url: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    const host = new URL(url).origin;
    if (host === this.origin && this.cookies.size)
      headers.set('cookie', [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; '));
    const res = await fetch(url, { ...init, headers, redirect: 'manual' });
    if (host === this.origin) {
      for (const c of res.headers.getSetCookie()) {
        const [pair] = c.split(';');
        const eq = pair!.indexOf('=');
        const name = pair!.slice(0, eq).trim();
        const value = pair!.slice(eq + 1).trim();
        if (value === '' || /expires=Thu, 01 Jan 1970/i.test(c)) this.cookies.delete(name);
        else this.cookies.set(name, value);
      }
    }
    return res;
  }

  /** Follows redirects within our server; stops at a page (200 or error) or a redirect elsewhere. */
  async follow(url: string, init: RequestInit = {}): Promise<{ res: Response; url: string }> {
    let res = await this.fetch(url, init);
    let at = url;
    for (let i = 0; i < 10 && res.status >= 300 && res.status < 400; i++) {
      const next = new URL(res.headers.get('location')!, at).href;
      if (new URL(next).origin !== this.origin) return { res, url: next };
      at = next;
      res = await this.fetch(at);
    }
    return { res, url: at };
  }

  /** Submits the page's form (its action and hidden fields) with `fields`. */
  async submit(
    page: string,
    pageUrl: string,
    fields: Record<string, string>,
    extra: Record<string, string> = {},
  ) {
    const action = /<form[^>]*action="([^"]+)"/.exec(page)?.[1];
    assert.ok(action, 'the page has a form');
    const hidden = Object.fromEntries(
      [...page.matchAll(/<input type="hidden" name="([^"]+)" value="([^"]*)"/g)].map((m) => [m[1]!, m[2]!]),
    );
    return this.follow(new URL(action.replace(/&amp;/g, '&'), pageUrl).href, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', origin: this.origin, ...extra },
      body: new URLSearchParams({ ...hidden, ...fields }),
    });
  }
}

/**
 * A person's access token by the authorization code flow: PKCE, the login page, the consent page
 * (with `consent` fields, e.g. a purpose or a patient), the token exchange.
 */
export async function personToken(opts: {
  serverUrl: string;
  fhirBase: string;
  clientId: string;
  redirectUri: string;
  scope: string;
  email: string;
  password: string;
  consent?: Record<string, string>;
}): Promise<Record<string, string>> {
  const { verifier, challenge } = pkce();
  const browser = new Browser(opts.serverUrl);
  let step = await browser.follow(
    `${opts.serverUrl}/oauth/authorize?${new URLSearchParams({
      response_type: 'code',
      client_id: opts.clientId,
      redirect_uri: opts.redirectUri,
      scope: opts.scope,
      state: 'zzstate',
      aud: opts.fhirBase,
      code_challenge: challenge,
      code_challenge_method: 'S256',
    })}`,
  );
  assert.equal(step.res.status, 200, 'the login page');
  step = await browser.submit(await step.res.text(), step.url, {
    email: opts.email,
    password: opts.password,
  });
  assert.equal(step.res.status, 200, 'the consent page');
  step = await browser.submit(await step.res.text(), step.url, { action: 'allow', ...opts.consent });
  const code = new URL(step.url).searchParams.get('code');
  assert.ok(code, 'a code back at the redirect URI');
  const res = await fetch(`${opts.serverUrl}/oauth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code,
      redirect_uri: opts.redirectUri,
      client_id: opts.clientId,
      code_verifier: verifier,
    }),
  });
  assert.equal(res.status, 200, 'the token exchange');
  return (await res.json()) as Record<string, string>;
}
