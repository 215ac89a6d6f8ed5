import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import {
  SignJWT,
  decodeJwt,
  decodeProtectedHeader,
  exportJWK,
  generateKeyPair,
  importJWK,
  type JWK,
} from 'jose';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { migrate, RESOURCE_MIGRATIONS } from '../src/store/migrations.ts';
import type { Logger, LogFields } from '../src/log/logger.ts';
import { CustosError } from '../src/kernel/errors.ts';
import { ClientRegistry, newClientId } from '../src/auth/client-registry.ts';
import { createAuthorizationServer, type AuthorizationServer } from '../src/auth/authorization-server.ts';
import { createAccessTokenVerifier } from '../src/auth/access-token.ts';
import { PostgresOidcAdapter, purgeExpiredOidcPayloads } from '../src/auth/oidc-adapter.ts';
import { allows, covers, parseSmartScope, parseSmartScopes } from '../src/auth/smart-scopes.ts';

const PROJECT = 'p1';
let db: PgliteDriver;
let dir: string;
let clients: ClientRegistry;
let auth: AuthorizationServer;
let server: http.Server;
let issuer: string;
let tokenUrl: string;
let verify: ReturnType<typeof createAccessTokenVerifier>;
const logged: string[] = [];
const recordingLogger: Logger = Object.fromEntries(
  (['debug', 'info', 'warn', 'error'] as const).map((level) => [
    level,
    (event: string, fields: LogFields = {}) => logged.push(JSON.stringify({ level, event, ...fields })),
  ]),
) as unknown as Logger;

before(async () => {
  db = await PgliteDriver.open(undefined);
  await migrate(db, RESOURCE_MIGRATIONS, 'custos_migration');
  await db.query(`INSERT INTO project (id, name, kind) VALUES ($1, 'Test', 'sandbox')`, [PROJECT]);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-auth-'));
  clients = new ClientRegistry({ db, keyFile: path.join(dir, 'keys', 'client-secret.key') });
  server = http.createServer((req, res) => auth.handler(req, res));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  issuer = `http://127.0.0.1:${port}`;
  tokenUrl = `${issuer}/oauth/token`;
  auth = await createAuthorizationServer({
    issuer,
    db,
    clients,
    signingKeyFile: path.join(dir, 'keys', 'signing-jwks.json'),
    log: recordingLogger,
  });
  verify = createAccessTokenVerifier({ issuer: auth.issuer, jwks: auth.jwks });
});

after(async () => {
  await new Promise((resolve) => server.close(resolve));
  await db.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

interface TokenResponse {
  status: number;
  headers: Headers;
  body: Record<string, unknown>;
}

async function postToken(
  params: Record<string, string>,
  headers: Record<string, string> = {},
): Promise<TokenResponse> {
  const res = await fetch(tokenUrl, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json', ...headers },
    body: new URLSearchParams(params),
  });
  return { status: res.status, headers: res.headers, body: (await res.json()) as Record<string, unknown> };
}

function basic(clientId: string, secret: string): Record<string, string> {
  // RFC 6749 section 2.3.1: form-urlencode each part, then base64.
  const enc = (s: string) => encodeURIComponent(s);
  return { authorization: `Basic ${Buffer.from(`${enc(clientId)}:${enc(secret)}`).toString('base64')}` };
}

const secretGrant = (clientId: string, secret: string, scope: string) =>
  postToken({ grant_type: 'client_credentials', scope }, basic(clientId, secret));

/** A SMART Backend Services client: a key pair whose public JWKS is registered. */
async function jwtClient(alg: 'RS384' | 'ES384' | 'RS256' | 'ES256', scopes = ['system/*.rs']) {
  const { publicKey, privateKey } = await generateKeyPair(alg, { extractable: true });
  const kid = randomUUID();
  const jwk = { ...(await exportJWK(publicKey)), kid, alg, use: 'sig' };
  const { clientId } = await clients.create({
    projectId: PROJECT,
    name: `backend ${alg}`,
    scopes,
    purposes: ['TREAT', 'HOPERAT'],
    jwks: { keys: [jwk] },
  });
  // https://hl7.org/fhir/smart-app-launch/backend-services.html#authenticating-to-the-token-endpoint
  const assertion = (claims: { aud?: string; exp?: number; jti?: string } = {}) =>
    new SignJWT({})
      .setProtectedHeader({ alg, kid, typ: 'JWT' })
      .setIssuer(clientId)
      .setSubject(clientId)
      .setAudience(claims.aud ?? tokenUrl)
      .setExpirationTime(claims.exp ?? Math.floor(Date.now() / 1000) + 240)
      .setJti(claims.jti ?? randomUUID())
      .sign(privateKey);
  const grant = (clientAssertion: string, scope = 'system/Patient.rs') =>
    postToken({
      grant_type: 'client_credentials',
      scope,
      client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
      client_assertion: clientAssertion,
    });
  return { clientId, kid, privateKey, assertion, grant };
}

async function rejectsUnauthenticated(p: Promise<unknown>): Promise<void> {
  await assert.rejects(
    p,
    (e: unknown) => e instanceof CustosError && e.code === 'UNAUTHENTICATED' && e.details.length === 0,
  );
}

test('client ids never start with - or _ (command-line options, spreadsheet formulas)', () => {
  // With plain base64url, 4,000 draws start with one of them about 125 times.
  const ids = Array.from({ length: 4000 }, newClientId);
  assert.equal(ids.filter((id) => /^[-_]/.test(id)).length, 0);
  assert.ok(ids.every((id) => /^[A-Za-z0-9][\w-]{21}$/.test(id)));
  assert.equal(new Set(ids).size, ids.length);
});

test('client_secret_basic: a JWT access token the verifier accepts, with the granted scopes and purpose', async () => {
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'basic',
    scopes: ['system/*.cruds'],
    purposes: ['TREAT'],
  });
  assert.ok(clientSecret);
  const res = await secretGrant(clientId, clientSecret, 'system/Patient.read system/Observation.rs');
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.token_type, 'Bearer');
  assert.equal(res.body.scope, 'system/Patient.read system/Observation.rs');
  assert.ok((res.body.expires_in as number) <= 300);
  assert.equal(res.headers.get('cache-control'), 'no-store');

  const token = res.body.access_token as string;
  const header = decodeProtectedHeader(token);
  assert.equal(header.alg, 'ES256');
  assert.equal(header.typ, 'at+jwt');
  const claims = decodeJwt(token);
  assert.ok(claims.exp! - claims.iat! <= 300, 'token lifetime at most 300 s');
  assert.equal(claims.aud, `${issuer}/fhir/R4`);
  assert.equal(claims.client_id, clientId);

  const v = await verify(token);
  assert.equal(v.clientId, clientId);
  assert.deepEqual(v.scopes, ['system/Patient.read', 'system/Observation.rs']);
  assert.equal(v.purposeOfUse, 'TREAT');
  assert.ok(allows(v.scopes, 'Observation', 's'));
  assert.ok(!allows(v.scopes, 'Observation', 'c'));
});

test('client_secret_post works; a wrong secret gets 401 invalid_client', async () => {
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'post',
    scopes: ['system/Patient.read'],
    purposes: ['TREAT', 'HOPERAT'],
  });
  const ok = await postToken({
    grant_type: 'client_credentials',
    scope: 'system/Patient.read',
    client_id: clientId,
    client_secret: clientSecret!,
  });
  assert.equal(ok.status, 200, JSON.stringify(ok.body));
  const v = await verify(ok.body.access_token as string);
  assert.equal(v.purposeOfUse, undefined, 'several purposes: no default purpose in the token');

  const wrong = await secretGrant(clientId, clientSecret!.slice(0, -2) + 'xx', 'system/Patient.read');
  assert.equal(wrong.status, 401);
  assert.equal(wrong.body.error, 'invalid_client');
  const unknown = await secretGrant('no-such-client', clientSecret!, 'system/Patient.read');
  assert.equal(unknown.status, 401);
  assert.equal(unknown.body.error, 'invalid_client');
});

test('rotated secret: the old one is refused, the new one works', async () => {
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'rotating',
    scopes: ['system/*.rs'],
    purposes: ['TREAT'],
  });
  assert.equal((await secretGrant(clientId, clientSecret!, 'system/*.rs')).status, 200);
  const next = await clients.rotateSecret(clientId);
  assert.notEqual(next, clientSecret);
  assert.equal((await clients.find(clientId))?.secretVersion, 1);
  const old = await secretGrant(clientId, clientSecret!, 'system/*.rs');
  assert.equal(old.status, 401);
  assert.equal(old.body.error, 'invalid_client');
  assert.equal((await secretGrant(clientId, next, 'system/*.rs')).status, 200);
});

test('private_key_jwt as SMART Backend Services specifies (RS384, ES384, RS256, ES256)', async () => {
  for (const alg of ['RS384', 'ES384', 'RS256', 'ES256'] as const) {
    const c = await jwtClient(alg);
    const res = await c.grant(await c.assertion());
    assert.equal(res.status, 200, `${alg}: ${JSON.stringify(res.body)}`);
    assert.equal(res.headers.get('cache-control'), 'no-store');
    const v = await verify(res.body.access_token as string);
    assert.equal(v.clientId, c.clientId);
    assert.deepEqual(v.scopes, ['system/Patient.rs']);
  }
});

test('private_key_jwt: a replayed assertion (same jti) is refused, and the replay cache is in Postgres', async () => {
  const c = await jwtClient('ES384');
  const assertion = await c.assertion();
  assert.equal((await c.grant(assertion)).status, 200);
  const replay = await c.grant(assertion);
  assert.equal(replay.status, 401);
  assert.equal(replay.body.error, 'invalid_client');
  // Same jti in a fresh assertion: still a replay.
  const { jti } = decodeJwt(assertion);
  const again = await c.grant(await c.assertion({ jti: jti! }));
  assert.equal(again.status, 401);

  const { rows } = await db.query<{ payload: { iss: string }; live: boolean }>(
    `SELECT payload, expires_at > now() AS live FROM oidc_payload WHERE model = 'ReplayDetection'`,
  );
  const mine = rows.filter((r) => r.payload.iss === c.clientId);
  assert.equal(mine.length, 1);
  assert.equal(mine[0]!.live, true);
});

test('oidc adapter: storage in oidc_payload, expiry, consume, indexes; replay recording is atomic', async () => {
  const grants = new PostgresOidcAdapter('AccessToken', db, clients);
  await grants.upsert('t1', { jti: 't1', grantId: 'g1', uid: 'u1', userCode: 'UC-1' }, 60);
  await grants.upsert('t2', { jti: 't2', grantId: 'g1' }, 60);
  await grants.upsert('t3', { jti: 't3' }, -1); // already expired
  assert.deepEqual(await grants.find('t1'), { jti: 't1', grantId: 'g1', uid: 'u1', userCode: 'UC-1' });
  assert.equal((await grants.findByUid('u1'))?.jti, 't1');
  assert.equal((await grants.findByUserCode('UC-1'))?.jti, 't1');
  assert.equal(await grants.find('t3'), undefined, 'expired rows are not found');
  await grants.consume('t1');
  assert.equal(typeof (await grants.find('t1'))?.consumed, 'number');
  await grants.revokeByGrantId('g1');
  assert.equal(await grants.find('t1'), undefined);
  assert.equal(await grants.find('t2'), undefined);
  await grants.upsert('t4', { jti: 't4' }, undefined);
  await grants.destroy('t4');
  assert.equal(await grants.find('t4'), undefined);
  assert.ok((await purgeExpiredOidcPayloads(db)) >= 1);

  // oidc-provider's ReplayDetection.unique() is find-then-upsert; two requests that both passed the
  // find must not both record the jti.
  const replay = new PostgresOidcAdapter('ReplayDetection', db, clients);
  await replay.upsert('j1', { jti: 'j1', iss: 'c' }, 60);
  await assert.rejects(replay.upsert('j1', { jti: 'j1', iss: 'c' }, 60), (e: unknown) => {
    return (e as { error?: string }).error === 'invalid_client';
  });
  await replay.upsert('j2', { jti: 'j2', iss: 'c' }, -1);
  await replay.upsert('j2', { jti: 'j2', iss: 'c' }, 60); // an expired entry may be recorded again

  const clientAdapter = new PostgresOidcAdapter('Client', db, clients);
  assert.equal(await clientAdapter.find('no-such-client'), undefined);
  const { clientId } = await clients.create({
    projectId: PROJECT,
    name: 'meta',
    scopes: ['system/*.rs'],
    purposes: ['TREAT'],
  });
  const meta = await clientAdapter.find(clientId);
  assert.equal(meta?.token_endpoint_auth_method, 'client_secret_basic');
  assert.deepEqual(meta?.grant_types, ['client_credentials']);
  assert.deepEqual(meta?.custos_scopes, ['system/*.rs']);
});

test('private_key_jwt: wrong aud, too long an exp, expired, unregistered key, wrong method: refused', async () => {
  const c = await jwtClient('RS384');
  for (const aud of [issuer, `${issuer}/fhir/R4`, 'https://other.example/token']) {
    const res = await c.grant(await c.assertion({ aud }));
    assert.equal(res.status, 401, aud);
    assert.equal(res.body.error, 'invalid_client');
  }
  const now = Math.floor(Date.now() / 1000);
  assert.equal((await c.grant(await c.assertion({ exp: now + 3600 }))).status, 401);
  assert.equal((await c.grant(await c.assertion({ exp: now - 60 }))).status, 401);

  // Signed with a key that is not in this client's registered JWKS (another client's).
  const other = await jwtClient('RS384');
  const forged = await new SignJWT({})
    .setProtectedHeader({ alg: 'RS384', kid: other.kid, typ: 'JWT' })
    .setIssuer(c.clientId)
    .setSubject(c.clientId)
    .setAudience(tokenUrl)
    .setExpirationTime(now + 240)
    .setJti(randomUUID())
    .sign(other.privateKey);
  const res = await c.grant(forged);
  assert.equal(res.status, 401);
  assert.equal(res.body.error, 'invalid_client');
  // A secret-based client cannot present an assertion, nor an assertion client a secret.
  const secretClient = await clients.create({
    projectId: PROJECT,
    name: 's',
    scopes: ['system/*.rs'],
    purposes: [],
  });
  const mixed = await secretGrant(c.clientId, secretClient.clientSecret!, 'system/*.rs');
  assert.equal(mixed.status, 401);

  // The Bulk Data / Backend Services test kit's cases: a bad grant type, a bad assertion type.
  const good = await c.assertion();
  const badGrant = await postToken({
    grant_type: 'password',
    scope: 'system/Patient.rs',
    client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
    client_assertion: good,
  });
  assert.equal(badGrant.status, 400);
  assert.equal(badGrant.body.error, 'unsupported_grant_type');
  const badType = await postToken({
    grant_type: 'client_credentials',
    scope: 'system/Patient.rs',
    client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:saml2-bearer',
    client_assertion: await c.assertion(),
  });
  assert.ok(badType.status === 400 || badType.status === 401, String(badType.status));
  assert.ok(['invalid_request', 'invalid_client'].includes(String(badType.body.error)));
  assert.equal(badType.body.access_token, undefined);
});

test('scopes: only what the registration covers is granted; nothing grantable is invalid_scope', async () => {
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'narrow',
    scopes: ['system/Patient.read', 'system/Observation.rs'],
    purposes: ['TREAT'],
  });
  const partial = await secretGrant(
    clientId,
    clientSecret!,
    'system/Patient.read system/Encounter.read system/Observation.cruds system/Observation.r openid',
  );
  assert.equal(partial.status, 200, JSON.stringify(partial.body));
  assert.equal(partial.body.scope, 'system/Patient.read system/Observation.r');
  assert.deepEqual((await verify(partial.body.access_token as string)).scopes, [
    'system/Patient.read',
    'system/Observation.r',
  ]);

  for (const scope of ['system/Encounter.read', 'system/*.rs', 'patient/Patient.read']) {
    const none = await secretGrant(clientId, clientSecret!, scope);
    assert.equal(none.status, 400, scope);
    assert.equal(none.body.error, 'invalid_scope');
  }
  const missing = await postToken({ grant_type: 'client_credentials' }, basic(clientId, clientSecret!));
  assert.equal(missing.body.error, 'invalid_scope');
  const otherAudience = await postToken(
    {
      grant_type: 'client_credentials',
      scope: 'system/Patient.read',
      resource: 'https://elsewhere.example/fhir',
    },
    basic(clientId, clientSecret!),
  );
  assert.equal(otherAudience.body.error, 'invalid_target');
});

test('a deactivated client is refused', async () => {
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'leaving',
    scopes: ['system/*.rs'],
    purposes: ['TREAT'],
  });
  assert.equal((await secretGrant(clientId, clientSecret!, 'system/*.rs')).status, 200);
  await clients.deactivate(clientId);
  const res = await secretGrant(clientId, clientSecret!, 'system/*.rs');
  assert.equal(res.status, 401);
  assert.equal(res.body.error, 'invalid_client');
  assert.equal((await clients.find(clientId))?.active, false);
  await assert.rejects(
    clients.rotateSecret(clientId),
    (e: unknown) => e instanceof CustosError && e.code === 'NOT_FOUND',
  );
});

test('verifier: expired token, token signed by another key, wrong audience, garbage: UNAUTHENTICATED', async () => {
  const signing = JSON.parse(fs.readFileSync(path.join(dir, 'keys', 'signing-jwks.json'), 'utf8')) as {
    keys: JWK[];
  };
  const ourKey = await importJWK(signing.keys[0]!, 'ES256');
  const kid = signing.keys[0]!.kid!;
  const now = Math.floor(Date.now() / 1000);
  const make = (key: Parameters<SignJWT['sign']>[0], claims: { iat: number; exp: number; aud?: string }) =>
    new SignJWT({ client_id: 'c1', scope: 'system/*.rs' })
      .setProtectedHeader({ alg: 'ES256', kid, typ: 'at+jwt' })
      .setIssuer(issuer)
      .setAudience(claims.aud ?? `${issuer}/fhir/R4`)
      .setIssuedAt(claims.iat)
      .setExpirationTime(claims.exp)
      .setJti(randomUUID())
      .sign(key);

  // The control: a token we make the same way but valid is accepted.
  assert.equal((await verify(await make(ourKey, { iat: now, exp: now + 60 }))).clientId, 'c1');
  await rejectsUnauthenticated(verify(await make(ourKey, { iat: now - 400, exp: now - 100 })));
  await rejectsUnauthenticated(verify(await make(ourKey, { iat: now - 3600, exp: now + 60 })));
  await rejectsUnauthenticated(verify(await make(ourKey, { iat: now, exp: now + 60, aud: issuer })));
  const { privateKey: otherKey } = await generateKeyPair('ES256');
  await rejectsUnauthenticated(verify(await make(otherKey, { iat: now, exp: now + 60 })));
  await rejectsUnauthenticated(verify('not.a.jwt'));
  await rejectsUnauthenticated(verify(''));

  // The token-forgery classics: alg none, HS256 keyed with our public key, a forged kid, not yet valid.
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = {
    client_id: 'c1',
    scope: 'system/*.rs',
    iss: issuer,
    aud: `${issuer}/fhir/R4`,
    iat: now,
    exp: now + 60,
    jti: randomUUID(),
  };
  await rejectsUnauthenticated(verify(`${b64({ alg: 'none', typ: 'at+jwt' })}.${b64(body)}.`));
  const publicJwk = auth.jwks().keys[0]!;
  const { createHmac } = await import('node:crypto');
  for (const secret of [JSON.stringify(publicJwk), `${publicJwk.x}${publicJwk.y}`]) {
    const input = `${b64({ alg: 'HS256', kid, typ: 'at+jwt' })}.${b64(body)}`;
    const mac = createHmac('sha256', secret).update(input).digest('base64url');
    await rejectsUnauthenticated(verify(`${input}.${mac}`));
  }
  const forgedKid = await new SignJWT({ client_id: 'c1', scope: 'system/*.rs' })
    .setProtectedHeader({ alg: 'ES256', kid: 'forged-kid', typ: 'at+jwt' })
    .setIssuer(issuer)
    .setAudience(`${issuer}/fhir/R4`)
    .setIssuedAt(now)
    .setExpirationTime(now + 60)
    .sign(otherKey);
  await rejectsUnauthenticated(verify(forgedKid));
  const notYet = await new SignJWT({ client_id: 'c1', scope: 'system/*.rs' })
    .setProtectedHeader({ alg: 'ES256', kid, typ: 'at+jwt' })
    .setIssuer(issuer)
    .setAudience(`${issuer}/fhir/R4`)
    .setIssuedAt(now)
    .setNotBefore(now + 120)
    .setExpirationTime(now + 240)
    .sign(ourKey);
  await rejectsUnauthenticated(verify(notYet));
  const wrongIssuer = await new SignJWT({ client_id: 'c1', scope: 'system/*.rs' })
    .setProtectedHeader({ alg: 'ES256', kid, typ: 'at+jwt' })
    .setIssuer('https://evil.example')
    .setAudience(`${issuer}/fhir/R4`)
    .setIssuedAt(now)
    .setExpirationTime(now + 60)
    .sign(ourKey);
  await rejectsUnauthenticated(verify(wrongIssuer));
});

test('discovery and JWKS: URLs from the configured issuer, public keys only, key files 0600', async () => {
  // A forged Host header must not change what discovery announces.
  const discovery = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const { port } = server.address() as { port: number };
    http
      .get(
        {
          host: '127.0.0.1',
          port,
          path: '/.well-known/openid-configuration',
          headers: { host: 'evil.example' },
        },
        (res) => {
          let text = '';
          res.on('data', (c: Buffer) => (text += c.toString()));
          res.on('end', () => resolve(JSON.parse(text) as Record<string, unknown>));
        },
      )
      .on('error', reject);
  });
  assert.equal(discovery.issuer, issuer);
  assert.equal(discovery.token_endpoint, tokenUrl);
  assert.equal(discovery.jwks_uri, `${issuer}/oauth/jwks`);
  assert.equal(discovery.introspection_endpoint, `${issuer}/oauth/introspect`);
  assert.equal(discovery.revocation_endpoint, `${issuer}/oauth/revoke`);
  // Without people (no users given) there is no authorization code flow.
  assert.ok((discovery.grant_types_supported as string[]).includes('client_credentials'));
  assert.ok(!(discovery.grant_types_supported as string[]).includes('authorization_code'));
  assert.ok((discovery.token_endpoint_auth_signing_alg_values_supported as string[]).includes('RS384'));
  assert.ok((discovery.token_endpoint_auth_signing_alg_values_supported as string[]).includes('ES384'));

  const jwks = (await (await fetch(`${issuer}/oauth/jwks`)).json()) as { keys: JWK[] };
  assert.deepEqual(jwks, auth.jwks());
  assert.ok(jwks.keys.length > 0 && jwks.keys.every((k) => k.d === undefined));

  for (const f of ['client-secret.key', 'signing-jwks.json']) {
    assert.equal(fs.statSync(path.join(dir, 'keys', f)).mode & 0o777, 0o600, f);
  }
});

test('no client secret anywhere in the database, nor in the logs', async () => {
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'audited',
    scopes: ['system/*.rs'],
    purposes: ['TREAT'],
  });
  const rotated = await clients.rotateSecret(clientId);
  const res = await secretGrant(clientId, rotated, 'system/*.rs');
  assert.equal(res.status, 200);
  await secretGrant(clientId, clientSecret!, 'system/*.rs'); // a refused attempt, logged

  const { rows: tables } = await db.query<{ table_name: string }>(
    `SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'`,
  );
  assert.ok(tables.some((t) => t.table_name === 'oauth_client'));
  let dump = '';
  for (const { table_name } of tables) {
    const { rows } = await db.query<{ row: string }>(`SELECT t::text AS row FROM "${table_name}" t`);
    dump += rows.map((r) => r.row).join('\n');
  }
  assert.ok(dump.includes(clientId), 'the dump does contain the client');
  for (const secret of [clientSecret!, rotated]) {
    assert.ok(!dump.includes(secret), 'a client secret is in the database');
    assert.ok(!logged.join('\n').includes(secret), 'a client secret is in the logs');
  }
  assert.ok(!logged.join('\n').includes(res.body.access_token as string), 'an access token is in the logs');
  assert.ok(
    logged.some((l) => l.includes('"code":"invalid_client"')),
    'refusals are logged by code',
  );
});

test('registry: validation, listing, restart, key file permissions', async () => {
  const bad = (input: Partial<Parameters<ClientRegistry['create']>[0]>) =>
    assert.rejects(
      clients.create({
        projectId: PROJECT,
        name: 'x',
        scopes: ['system/*.rs'],
        purposes: ['TREAT'],
        ...input,
      }),
      (e: unknown) => e instanceof CustosError && e.code === 'BAD_REQUEST',
    );
  await bad({ scopes: [] });
  await bad({ scopes: ['system/Patient.sr'] });
  await bad({ purposes: ['treat'] });
  const { privateKey } = await generateKeyPair('ES384', { extractable: true });
  await bad({ jwks: { keys: [await exportJWK(privateKey)] } }); // private key material
  await bad({ jwks: { keys: [] } });
  await assert.rejects(
    clients.create({ projectId: 'no-such-project', name: 'x', scopes: ['system/*.rs'], purposes: [] }),
    (e: unknown) => e instanceof CustosError && e.code === 'NOT_FOUND',
  );

  const listed = await clients.listByProject(PROJECT);
  assert.ok(listed.length > 5);
  assert.ok(listed.every((c) => c.projectId === PROJECT && /^[A-Za-z0-9_-]{22}$/.test(c.id)));
  const jwt = listed.find((c) => c.authMethod === 'private_key_jwt');
  assert.ok(jwt?.jwks?.keys.length === 1);

  // After a restart (a new registry on the same key file) secrets still verify.
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'restart',
    scopes: ['system/*.rs'],
    purposes: [],
  });
  const keyFile = path.join(dir, 'keys', 'client-secret.key');
  const again = new ClientRegistry({ db, keyFile });
  assert.equal(again.currentSecret((await again.find(clientId))!), clientSecret);
  // A key file others can read is refused.
  const loose = path.join(dir, 'loose.key');
  fs.writeFileSync(loose, fs.readFileSync(keyFile), { mode: 0o644 });
  fs.chmodSync(loose, 0o644);
  assert.throws(
    () => new ClientRegistry({ db, keyFile: loose }),
    (e: unknown) => e instanceof CustosError && e.code === 'CONFIG_INVALID',
  );
});

test('smart-scopes: v1 and v2 parsing, allows, covers', () => {
  assert.deepEqual(parseSmartScope('system/Patient.read'), {
    context: 'system',
    resourceType: 'Patient',
    c: false,
    r: true,
    u: false,
    d: false,
    s: true,
  });
  assert.deepEqual(parseSmartScope('system/*.write'), {
    context: 'system',
    resourceType: '*',
    c: true,
    r: false,
    u: true,
    d: true,
    s: false,
  });
  for (const all of ['system/*.*', 'system/*.cruds']) {
    const p = parseSmartScope(all)!;
    assert.ok(p.c && p.r && p.u && p.d && p.s && p.resourceType === '*', all);
  }
  assert.deepEqual(parseSmartScope('system/Observation.rs'), {
    context: 'system',
    resourceType: 'Observation',
    c: false,
    r: true,
    u: false,
    d: false,
    s: true,
  });
  assert.equal(parseSmartScope('patient/Observation.rs')?.context, 'patient');
  assert.equal(parseSmartScope('user/Encounter.cu')?.context, 'user');
  for (const invalid of [
    'openid',
    'launch/patient',
    'system/Patient',
    'system/Patient.',
    'system/Patient.sr', // v2 letters must be in cruds order
    'system/Patient.rr',
    'system/patient.read',
    'admin/Patient.read',
    'system/*.rs?category=laboratory',
    'system/Observation.read?category=laboratory',
    'system/*.readwrite',
    '',
  ]) {
    assert.equal(parseSmartScope(invalid), null, invalid);
  }
  assert.equal(parseSmartScopes('openid system/*.rs bogus').length, 1);
  // A granular v2 scope keeps its criteria, and never counts as the unrestricted scope.
  const granular = parseSmartScope('system/Observation.rs?category=laboratory');
  assert.equal(granular?.query, 'category=laboratory');
  assert.equal(allows([granular!], 'Observation', 'r'), false);
  assert.equal(covers([granular!], parseSmartScope('system/Observation.rs')!), false);

  assert.ok(allows(['system/*.rs'], 'Patient', 'r'));
  assert.ok(allows(['system/*.rs'], 'Patient', 's'));
  assert.ok(!allows(['system/*.rs'], 'Patient', 'u'));
  assert.ok(allows(['system/Patient.write'], 'Patient', 'd'));
  assert.ok(!allows(['system/Patient.write'], 'Observation', 'd'));
  assert.ok(!allows(['patient/*.cruds'], 'Patient', 'r'), 'patient scopes count only in patient context');
  assert.ok(allows(['patient/*.cruds'], 'Patient', 'r', 'patient'));
  assert.ok(!allows(['nonsense', 'system/Patient.sr'], 'Patient', 'r'));

  const reg = parseSmartScopes(['system/*.rs', 'system/Observation.c']);
  assert.ok(covers(reg, parseSmartScope('system/Patient.read')!));
  assert.ok(covers(reg, parseSmartScope('system/Observation.crs')!));
  assert.ok(!covers(reg, parseSmartScope('system/Patient.crs')!));
  assert.ok(!covers(reg, parseSmartScope('system/*.cruds')!));
  assert.ok(!covers(reg, parseSmartScope('patient/Patient.read')!));
});

test('introspection and revocation need client auth; JWT access tokens are self-contained; no other flows', async () => {
  const { clientId, clientSecret } = await clients.create({
    projectId: PROJECT,
    name: 'introspecting',
    scopes: ['system/*.rs'],
    purposes: ['TREAT'],
  });
  const token = (await secretGrant(clientId, clientSecret!, 'system/*.rs')).body.access_token as string;
  for (const endpoint of ['introspect', 'revoke']) {
    const post = (headers: Record<string, string>) =>
      fetch(`${issuer}/oauth/${endpoint}`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded', ...headers },
        body: new URLSearchParams({ token }),
      });
    const anonymous = await post({});
    assert.equal(((await anonymous.json()) as { error: string }).error, 'invalid_request', endpoint);
    // oidc-provider does not introspect or revoke structured (JWT) tokens: they live at most 300 s.
    const authed = await post(basic(clientId, clientSecret!));
    assert.equal(((await authed.json()) as { error: string }).error, 'unsupported_token_type', endpoint);
  }
  const authorize = await fetch(
    `${issuer}/oauth/authorize?client_id=${clientId}&response_type=code&scope=openid`,
  );
  assert.equal(authorize.status, 400);
  assert.equal(await authorize.text(), 'error: unsupported_response_type\n');
  const code = await postToken(
    { grant_type: 'authorization_code', code: 'x' },
    basic(clientId, clientSecret!),
  );
  assert.equal(code.body.error, 'unsupported_grant_type');
});
