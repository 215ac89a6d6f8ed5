import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { HTEST, startHarness, testPatient, type Harness } from './support/harness.ts';
import { Browser, pkce } from './support/smart-login.ts';
import type { CustosCore } from '../src/server.ts';

// SMART App Launch, standalone, driven by the SMART on FHIR JavaScript client (fhirclient, in its
// Node mode) against a running server: discovery, authorization code with PKCE, the login and
// consent pages (driven here over HTTP as a browser would: cookies, redirects, form posts; the
// real-browser run is test/browser-login.test.ts), the token response, reads confined to the
// launched patient, rotating refresh tokens. Then the refusals the SMART test kit checks.

const require = createRequire(import.meta.url);
// fhirclient's Node entry (`require('fhirclient')`) is `new NodeAdapter({ request, response, storage })`;
// built here directly to add `refreshTokenWithClientId`, which a public app needs (RFC 6749 section 6).
const NodeAdapter = (
  require('fhirclient/lib/adapters/NodeAdapter') as {
    default: new (opts: Record<string, unknown>) => { getSmartApi(): SmartApi };
  }
).default;
interface SmartApi {
  authorize(opts: Record<string, unknown>): Promise<unknown>;
  ready(): Promise<FhirClientLike>;
}
const smart = (request: unknown, response: unknown, storage: unknown): SmartApi =>
  new NodeAdapter({ request, response, storage, refreshTokenWithClientId: true }).getSmartApi();
interface FhirClientLike {
  patient: { id: string | null };
  encounter: { id: string | null };
  state: { tokenResponse?: Record<string, unknown> };
  request<T = unknown>(url: string): Promise<T>;
  refresh(): Promise<unknown>;
  getFhirUser(): string | null;
}

const PASSWORD = 'Zz-synthetic-passphrase-0117';
const REDIRECT = 'http://127.0.0.1:9/callback';
const APP_SCOPES = 'openid fhirUser launch/patient offline_access patient/*.rs';

/** fhirclient's Node mode needs a request, a response and a storage: these stand in for an app's. */
function appContext(url: string) {
  const store = new Map<string, unknown>();
  const storage = {
    get: async (k: string) => store.get(k),
    set: async (k: string, v: unknown) => void store.set(k, v),
    unset: async (k: string) => store.delete(k),
  };
  let location: string | undefined;
  const res = {
    writeHead: (_status: number, headers: Record<string, string>) => void (location = headers.location),
    end: () => undefined,
  };
  const u = new URL(url);
  const req = (path: string) => ({ headers: { host: u.host }, url: path, socket: {} });
  return { storage, res, req, location: () => location };
}

async function createUser(
  core: CustosCore,
  projectId: string,
  role: string,
  email: string,
  fhirUser: string,
) {
  return core.users.create({ projectId, role, email, fhirUser, password: PASSWORD });
}

/** Runs a standalone launch through login and consent; returns the app's redirect (with code or error). */
async function launch(
  h: Harness,
  browser: Browser,
  authorizeUrl: string,
  login: { email: string; password?: string },
  consent: Record<string, string> = {},
): Promise<string> {
  let { res, url } = await browser.follow(authorizeUrl);
  assert.equal(res.status, 200, 'the login page');
  let page = await res.text();
  assert.match(page, /Sign in/);
  ({ res, url } = await browser.submit(page, url, {
    email: login.email,
    password: login.password ?? PASSWORD,
  }));
  assert.equal(res.status, 200, 'the consent page');
  page = await res.text();
  assert.match(page, /Test launch app/, 'the consent page names the app');
  ({ res, url } = await browser.submit(page, url, { action: 'allow', ...consent }));
  assert.ok(res.status === 302 || res.status === 303, `back to the app (got ${res.status})`);
  assert.ok(url.startsWith(REDIRECT), 'to its registered redirect URI');
  void h;
  return url;
}

describe('SMART standalone launch with fhirclient', () => {
  let h: Harness;
  let core: CustosCore;
  let projectId: string;
  let appId: string;
  let own: string;
  let other: string;
  let patientEmail: string;

  before(async () => {
    h = await startHarness();
    core = h.server.core;
    projectId = h.init.projectId;
    const create = async (family: string) => {
      const r = await h.fhir('/Patient', {
        method: 'POST',
        body: JSON.stringify(testPatient({ name: [{ family, given: ['Zztest'] }] })),
      });
      assert.equal(r.status, 201);
      return ((await r.json()) as { id: string }).id;
    };
    own = await create('Zzlaunchone');
    other = await create('Zzlaunchtwo');
    patientEmail = 'pat.zzlaunch@example.org';
    await createUser(core, projectId, 'patient', patientEmail, `Patient/${own}`);
    const app = await core.admin.createClient({
      projectId,
      name: 'Test launch app',
      scopes: APP_SCOPES.split(' '),
      purposes: ['PATRQT'],
      redirectUris: [REDIRECT],
      public: true,
    });
    appId = app.clientId;
    assert.equal(app.clientSecret, undefined, 'a public app gets no secret');
  });
  after(() => h.close());

  test('discovery lists the launch capabilities and PKCE S256 only', async () => {
    const conf = (await (await fetch(`${h.base}/.well-known/smart-configuration`)).json()) as Record<
      string,
      string[] | string
    >;
    assert.equal(conf.authorization_endpoint, `${h.server.url}/oauth/authorize`);
    for (const c of [
      'launch-standalone',
      'client-public',
      'context-standalone-patient',
      'sso-openid-connect',
    ])
      assert.ok((conf.capabilities as string[]).includes(c), c);
    assert.deepEqual(conf.code_challenge_methods_supported, ['S256']);
    assert.ok((conf.grant_types_supported as string[]).includes('authorization_code'));
    const cs = (await (await fetch(`${h.base}/metadata`)).json()) as {
      rest: { security: { extension: { extension: { url: string; valueUri: string }[] }[] } }[];
    };
    const uris = cs.rest[0]!.security.extension[0]!.extension;
    assert.equal(uris.find((e) => e.url === 'authorize')?.valueUri, `${h.server.url}/oauth/authorize`);
  });

  test('a patient launches the app, logs in, consents; the app reads their record and nothing else', async () => {
    const app = appContext(REDIRECT);
    await smart(app.req('/launch'), app.res, app.storage).authorize({
      clientId: appId,
      scope: APP_SCOPES,
      redirectUri: REDIRECT,
      iss: h.base,
      pkceMode: 'required',
    });
    const authorizeUrl = app.location()!;
    assert.ok(authorizeUrl?.startsWith(`${h.server.url}/oauth/authorize?`));
    assert.match(authorizeUrl, /code_challenge_method=S256/);

    const browser = new Browser(h.server.url);
    const back = await launch(h, browser, authorizeUrl, { email: patientEmail });
    const callback = new URL(back);
    assert.ok(callback.searchParams.get('code'));

    const client = await smart(
      app.req(`${callback.pathname}${callback.search}`),
      app.res,
      app.storage,
    ).ready();
    const tr = client.state.tokenResponse!;
    assert.equal(client.patient.id, own, 'the launch patient: a patient user is their own patient');
    assert.equal(tr.patient, own);
    assert.equal(tr.token_type, 'Bearer');
    assert.ok(Number(tr.expires_in) <= 300, 'access tokens live at most five minutes');
    assert.ok(typeof tr.refresh_token === 'string', 'offline_access gives a refresh token');
    assert.ok(typeof tr.id_token === 'string', 'openid gives an id_token');
    assert.equal(client.getFhirUser(), `Patient/${own}`, 'the id_token names the user by fhirUser');
    assert.ok(String(tr.scope).split(' ').includes('patient/*.rs'));

    const me = await client.request<{ id: string; name: { family: string }[] }>(`Patient/${own}`);
    assert.equal(me.id, own);
    assert.equal(me.name[0]!.family, 'Zzlaunchone');
    // Another patient: out of reach, and the answer does not say whether it exists.
    await assert.rejects(client.request(`Patient/${other}`), (e: { status?: number }) => e.status === 404);
    const bundle = await client.request<{ entry?: { resource: { id: string } }[] }>('Patient');
    assert.deepEqual(
      (bundle.entry ?? []).map((e) => e.resource.id),
      [own],
      'a search returns only the compartment of the launch patient',
    );

    // Refresh: a new refresh token each time; the old one is refused after use.
    const firstRefresh = String(tr.refresh_token);
    await client.refresh();
    const second = String(client.state.tokenResponse!.refresh_token);
    assert.notEqual(second, firstRefresh, 'refresh tokens rotate');
    const replay = await fetch(`${h.server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'refresh_token',
        refresh_token: firstRefresh,
        client_id: appId,
      }),
    });
    assert.equal(replay.status, 400);
    assert.equal(((await replay.json()) as { error: string }).error, 'invalid_grant');
    const again = await client.request<{ id: string }>(`Patient/${own}`);
    assert.equal(again.id, own, 'the refreshed token keeps the launch context');

    // Issuance is audited with the person and the client.
    const entries = (await core.audit.read(0, 1_000_000)).map(
      (r) => JSON.parse(r.entry.toString('utf8')) as Record<string, any>,
    );
    const issued = entries.filter((e) => e.action === 'authenticate' && e.code === 'token.issued');
    assert.ok(
      issued.some((e) => e.actor.clientId === appId && e.actor.userId && e.purposeOfUse === 'PATRQT'),
    );
  });

  test('PKCE is required, S256 only; the redirect URI must be registered exactly', async () => {
    const { challenge } = pkce();
    const authorize = (params: Record<string, string>) =>
      fetch(
        `${h.server.url}/oauth/authorize?${new URLSearchParams({
          response_type: 'code',
          client_id: appId,
          redirect_uri: REDIRECT,
          scope: 'openid patient/*.rs',
          state: 'zzstate',
          aud: h.base,
          ...params,
        })}`,
        { redirect: 'manual' },
      );
    const errorOf = (res: Response) =>
      new URL(res.headers.get('location') ?? 'x:/').searchParams.get('error');

    const missing = await authorize({});
    assert.equal(errorOf(missing), 'invalid_request', 'no code_challenge: refused');
    const plain = await authorize({ code_challenge: challenge, code_challenge_method: 'plain' });
    assert.equal(errorOf(plain), 'invalid_request', 'plain: refused');
    const ok = await authorize({ code_challenge: challenge, code_challenge_method: 'S256' });
    assert.equal(ok.status, 303);
    assert.match(ok.headers.get('location')!, /^\/oauth\/interaction\//);

    for (const redirect of [
      'https://evil.example/cb',
      `${REDIRECT}/../../evil`,
      `${REDIRECT}?next=https://evil.example`,
    ]) {
      const res = await authorize({
        redirect_uri: redirect,
        code_challenge: challenge,
        code_challenge_method: 'S256',
      });
      assert.equal(res.status, 400, `not redirected to ${redirect}`);
      assert.equal(res.headers.get('location'), null, 'no open redirect');
    }
  });

  test('the login form refuses a post without its CSRF token or from another origin', async () => {
    const { challenge } = pkce();
    const browser = new Browser(h.server.url);
    const { res, url } = await browser.follow(
      `${h.server.url}/oauth/authorize?${new URLSearchParams({
        response_type: 'code',
        client_id: appId,
        redirect_uri: REDIRECT,
        scope: 'openid patient/*.rs',
        state: 'zzstate',
        code_challenge: challenge,
        code_challenge_method: 'S256',
      })}`,
    );
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('x-frame-options'), 'DENY', 'the login page may not be framed');
    assert.match(res.headers.get('cache-control') ?? '', /no-store/);
    const page = await res.text();
    const noCsrf = await browser.fetch(`${url}/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', origin: h.server.url },
      body: new URLSearchParams({ email: patientEmail, password: PASSWORD }),
    });
    assert.equal(noCsrf.status, 403);
    const csrf = /name="csrf" value="([^"]+)"/.exec(page)![1]!;
    const foreign = await browser.fetch(`${url}/login`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', origin: 'https://evil.example' },
      body: new URLSearchParams({ email: patientEmail, password: PASSWORD, csrf }),
    });
    assert.equal(foreign.status, 403);
    // A wrong password: the page again, saying so, without telling which part was wrong.
    const wrong = await browser.submit(page, url, {
      email: patientEmail,
      password: 'Zz-not-the-passphrase-01',
    });
    assert.equal(wrong.res.status, 401);
    assert.match(await wrong.res.text(), /The email, password or code is not right/);
  });

  test('a system client cannot get patient scopes by client credentials, nor an app system scopes', async () => {
    const res = await fetch(`${h.server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        scope: 'patient/*.rs',
        client_id: h.init.clientId,
        client_secret: h.init.clientSecret!,
      }),
    });
    assert.equal(res.status, 400);
    assert.equal(((await res.json()) as { error: string }).error, 'invalid_scope');
    await assert.rejects(
      core.admin.createClient({
        projectId,
        scopes: ['system/*.rs'],
        purposes: ['TREAT'],
        redirectUris: ['https://app.example/cb'],
        public: true,
      }),
      (e: { code?: string }) => e.code === 'BAD_REQUEST',
    );
  });

  test('a deactivated user: the live access token stops working, the refresh token is gone', async () => {
    const email = 'pat.zzdeactivate@example.org';
    const { userId } = await createUser(core, projectId, 'patient', email, `Patient/${other}`);
    const app = appContext(REDIRECT);
    await smart(app.req('/launch'), app.res, app.storage).authorize({
      clientId: appId,
      scope: APP_SCOPES,
      redirectUri: REDIRECT,
      iss: h.base,
      pkceMode: 'required',
    });
    const back = new URL(await launch(h, new Browser(h.server.url), app.location()!, { email }));
    const client = await smart(app.req(`${back.pathname}${back.search}`), app.res, app.storage).ready();
    assert.equal((await client.request<{ id: string }>(`Patient/${other}`)).id, other);
    const refreshToken = String(client.state.tokenResponse!.refresh_token);
    await core.users.deactivate({ userId });
    await new Promise((r) => setTimeout(r, 2100)); // USER_CACHE_MS
    await assert.rejects(client.request(`Patient/${other}`), (e: { status?: number }) => e.status === 401);
    const refresh = await fetch(`${h.server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'refresh_token',
        refresh_token: refreshToken,
        client_id: appId,
      }),
    });
    assert.equal(refresh.status, 400);
  });

  test('EHR launch: the launch the EHR created sets patient and encounter; another app cannot use it', async () => {
    const post = async (body: Record<string, unknown>) => {
      const r = await h.fhir(`/${String(body.resourceType)}`, { method: 'POST', body: JSON.stringify(body) });
      assert.equal(r.status, 201);
      return ((await r.json()) as { id: string }).id;
    };
    const doc = await post(testPatient({ resourceType: 'Practitioner', name: [{ family: 'Zzehrdoc' }] }));
    const patient = await post(
      testPatient({
        name: [{ family: 'Zzehrpatient' }],
        generalPractitioner: [{ reference: `Practitioner/${doc}` }],
      }),
    );
    const encounter = await post({
      resourceType: 'Encounter',
      meta: { security: [HTEST] },
      status: 'in-progress',
      class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB' },
      subject: { reference: `Patient/${patient}` },
    });
    const email = 'dr.zzehr@example.org';
    await createUser(core, projectId, 'practitioner', email, `Practitioner/${doc}`);
    const scope = 'launch openid fhirUser patient/*.rs';
    const ehrApp = await core.admin.createClient({
      projectId,
      name: 'Test launch app (EHR)',
      scopes: scope.split(' '),
      purposes: ['TREAT'],
      redirectUris: [REDIRECT],
      public: true,
    });
    // The EHR creates the launch through the admin API (what `custos launch` calls).
    const adminToken = fs.readFileSync(path.join(h.config.dataDir, 'admin-token'), 'utf8').trim();
    const created = await fetch(`${h.server.url}/admin/launches`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-custos-admin-token': adminToken },
      body: JSON.stringify({ clientId: ehrApp.clientId, patient, encounter }),
    });
    assert.equal(created.status, 200);
    const { launch, iss } = (await created.json()) as { launch: string; iss: string };
    assert.equal(iss, h.base);
    // An app without the launch scope cannot be launched this way.
    const refused = await fetch(`${h.server.url}/admin/launches`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-custos-admin-token': adminToken },
      body: JSON.stringify({ clientId: appId, patient }),
    });
    assert.equal(refused.status, 400);

    // Another app presenting this launch id: refused at consent.
    const thief = appContext(REDIRECT);
    await smart(thief.req('/launch'), thief.res, thief.storage).authorize({
      clientId: appId,
      scope: `launch ${APP_SCOPES}`,
      redirectUri: REDIRECT,
      iss: h.base,
      launch,
    });
    const b1 = new Browser(h.server.url);
    let step = await b1.follow(thief.location()!);
    step = await b1.submit(await step.res.text(), step.url, { email, password: PASSWORD });
    const thiefPage = await step.res.text();
    assert.doesNotMatch(thiefPage, /Allow/, 'no consent offered');

    const app = appContext(REDIRECT);
    await smart(app.req('/launch'), app.res, app.storage).authorize({
      clientId: ehrApp.clientId,
      scope,
      redirectUri: REDIRECT,
      iss: h.base,
      launch,
    });
    assert.match(app.location()!, /[?&]launch=/);
    const b2 = new Browser(h.server.url);
    let page = await b2.follow(app.location()!);
    page = await b2.submit(await page.res.text(), page.url, { email, password: PASSWORD });
    const consent = await page.res.text();
    assert.doesNotMatch(consent, /Patient id/, 'no patient picker: the EHR chose the patient');
    page = await b2.submit(consent, page.url, { action: 'allow' });
    const back = new URL(page.url);
    const client = await smart(app.req(`${back.pathname}${back.search}`), app.res, app.storage).ready();
    assert.equal(client.patient.id, patient);
    assert.equal(client.encounter.id, encounter);
    assert.deepEqual(client.state.tokenResponse!.fhirContext, [{ reference: `Encounter/${encounter}` }]);
    assert.equal((await client.request<{ id: string }>(`Encounter/${encounter}`)).id, encounter);

    // An authorization request for another FHIR server (`aud`) is refused, without a redirect.
    const wrongAud = await fetch(
      `${h.server.url}/oauth/authorize?${new URLSearchParams({
        response_type: 'code',
        client_id: ehrApp.clientId,
        redirect_uri: REDIRECT,
        scope,
        aud: 'https://other.example/fhir',
        code_challenge: pkce().challenge,
        code_challenge_method: 'S256',
      })}`,
      { redirect: 'manual' },
    );
    assert.equal(wrongAud.status, 400);
    assert.equal(wrongAud.headers.get('location'), null);
  });

  test('credential stuffing at volume is rate limited per address, and audited', async () => {
    const { challenge } = pkce();
    const browser = new Browser(h.server.url);
    const { res, url } = await browser.follow(
      `${h.server.url}/oauth/authorize?${new URLSearchParams({
        response_type: 'code',
        client_id: appId,
        redirect_uri: REDIRECT,
        scope: 'openid patient/*.rs',
        state: 'zzstate',
        code_challenge: challenge,
        code_challenge_method: 'S256',
      })}`,
    );
    const page = await res.text();
    const statuses: number[] = [];
    for (let i = 0; i < 14; i++) {
      // A different X-Forwarded-For each time: not believed (no trusted proxy), so no way around the limit.
      const r = await browser.submit(
        page,
        url,
        { email: `nobody${i}.zz@example.org`, password: 'Zz-guess-0100' },
        { 'x-forwarded-for': `198.51.100.${i + 1}` },
      );
      statuses.push(r.res.status);
    }
    assert.ok(statuses.includes(401), 'the first attempts are answered');
    assert.equal(statuses.at(-1), 429, 'then refused with 429');
    const entries = (await core.audit.read(0, 1_000_000)).map(
      (r) => JSON.parse(r.entry.toString('utf8')) as Record<string, any>,
    );
    assert.ok(entries.some((e) => e.action === 'authenticate' && e.code === 'login.rate_limited'));
  });

  test("CORS: the token endpoint answers browsers from the origin of the app's redirect URIs only", async () => {
    const preflight = (origin: string) =>
      fetch(`${h.server.url}/oauth/token`, {
        method: 'OPTIONS',
        headers: {
          origin,
          'access-control-request-method': 'POST',
          'access-control-request-headers': 'content-type',
        },
      });
    const post = (origin: string) =>
      fetch(`${h.server.url}/oauth/token`, {
        method: 'POST',
        headers: { origin, 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({
          grant_type: 'refresh_token',
          refresh_token: 'zz-none',
          client_id: appId,
        }),
      });
    const appOrigin = new URL(REDIRECT).origin;
    const ok = await post(appOrigin);
    assert.equal(ok.headers.get('access-control-allow-origin'), appOrigin);
    const evil = await post('https://evil.example');
    assert.equal(evil.headers.get('access-control-allow-origin'), null, 'another origin gets no CORS grant');
    const pre = await preflight(appOrigin);
    assert.ok(pre.status < 300);
  });

  test('the token endpoint is rate limited per address; a forged X-Forwarded-For does not help', async () => {
    const statuses: number[] = [];
    for (let i = 0; i < 100; i++) {
      const res = await fetch(`${h.server.url}/oauth/token`, {
        method: 'POST',
        headers: {
          'content-type': 'application/x-www-form-urlencoded',
          'x-forwarded-for': `203.0.113.${(i % 250) + 1}`,
        },
        body: new URLSearchParams({
          grant_type: 'client_credentials',
          client_id: 'zz-nobody',
          client_secret: 'x',
        }),
      });
      statuses.push(res.status);
      await res.arrayBuffer();
    }
    assert.ok(statuses.includes(401), 'answered at first');
    assert.ok(statuses.includes(429), 'then slowed down');
  });
});
