/**
 * Token verification benchmark: `npm run bench:token` (= node --import tsx bench/token-bench.ts [--ms N]).
 *
 * What does checking a bearer token cost per FHIR request (issue 6)?
 *
 *   decode     jose `decodeJwt` (base64url + JSON, no signature): the baseline, what any use of
 *              a JWT costs.
 *   verify     src/auth/access-token.ts `createAccessTokenVerifier` on a fresh token each call:
 *              ES256 signature, issuer, audience, typ, lifetime (what the first request with a
 *              token pays).
 *   principal  src/auth/authenticate.ts `createAuthenticator` on a token already seen (the verified
 *              claims cached until `exp`, the client and the user cached 2 s): what every later
 *              request with the same token pays; system-client and person tokens.
 *
 * Tokens are signed here with jose exactly as the authorization server signs them (ES256,
 * `typ: at+jwt`, same claims); no server runs. Prints one JSON document: microseconds per call
 * (median of 5 rounds) and each figure's ratio to `decode`. Results: docs/bench.md.
 */
import { parseArgs } from 'node:util';
import { randomUUID } from 'node:crypto';
import { decodeJwt, exportJWK, generateKeyPair, SignJWT, type JWK } from 'jose';
import { createAccessTokenVerifier } from '../src/auth/access-token.ts';
import { createAuthenticator } from '../src/auth/authenticate.ts';
import type { ClientRegistration, ClientRegistry } from '../src/auth/client-registry.ts';
import type { User } from '../src/auth/users.ts';

const { values: flags } = parseArgs({ options: { ms: { type: 'string', default: '1500' } } });
const MS = Number(flags.ms);
const ISSUER = 'http://127.0.0.1:8080';

const { privateKey, publicKey } = await generateKeyPair('ES256');
const jwk: JWK = { ...(await exportJWK(publicKey)), kid: 'k1', alg: 'ES256', use: 'sig' };
const jwks = { keys: [jwk] };
const sign = (extra: Record<string, unknown> = {}, sub = 'client-1') =>
  new SignJWT({ client_id: 'client-1', scope: 'system/*.rs patient/*.rs', ...extra })
    .setProtectedHeader({ alg: 'ES256', kid: 'k1', typ: 'at+jwt' })
    .setIssuer(ISSUER)
    .setAudience(`${ISSUER}/fhir/R4`)
    .setSubject(sub)
    .setIssuedAt()
    .setExpirationTime('5m')
    .setJti(randomUUID())
    .sign(privateKey);

const client: ClientRegistration = {
  id: 'client-1',
  projectId: 'p1',
  name: 'bench',
  authMethod: 'client_secret',
  secretVersion: 0,
  jwks: undefined,
  scopes: ['system/*.rs', 'patient/*.rs', 'launch/patient'],
  purposes: ['TREAT'],
  mayBreakGlass: false,
  active: true,
  redirectUris: ['https://app.example/cb'],
};
const user: User = {
  id: 'user-1',
  projectId: 'p1',
  role: 'patient',
  email: 'pat.zzbench@example.org',
  fhirUser: 'Patient/zz1',
  active: true,
  mfaEnrolled: false,
};
const clients = { find: async () => client } as unknown as ClientRegistry;
const users = { find: async () => user };
const verify = createAccessTokenVerifier({ issuer: ISSUER, jwks: () => jwks });
const authenticate = createAuthenticator({ verify, clients, users });

/** Microseconds per call of `fn` over MS milliseconds (after a warm-up), median of 5 rounds. */
async function time(fn: (i: number) => unknown): Promise<number> {
  const rounds: number[] = [];
  for (let r = 0; r < 6; r++) {
    let n = 0;
    const start = performance.now();
    while (performance.now() - start < MS) await fn(n++);
    if (r > 0) rounds.push(((performance.now() - start) * 1000) / n);
  }
  return rounds.sort((a, b) => a - b)[2]!;
}

const POOL = 2000;
const systemTokens = await Promise.all(Array.from({ length: POOL }, () => sign()));
const personTokens = await Promise.all(
  Array.from({ length: POOL }, () =>
    sign({ user_role: 'patient', fhirUser: 'Patient/zz1', patient: 'zz1' }, 'user-1'),
  ),
);

process.stderr.write('decode…\n');
const decode = await time((i) => decodeJwt(systemTokens[i % POOL]!));
process.stderr.write('verify (fresh tokens, uncached)…\n');
// A fresh verifier per round would re-import the key; the verifier caches only the key set, not
// tokens, so every call below checks a signature.
const verifyUs = await time((i) => verify(systemTokens[i % POOL]!));
process.stderr.write('principal (cached)…\n');
await authenticate(systemTokens[0]!);
await authenticate(personTokens[0]!);
const principalSystem = await time(() => authenticate(systemTokens[0]!));
const principalPerson = await time(() => authenticate(personTokens[0]!));

const ratio = (x: number) => Number((x / decode).toFixed(1));
console.log(
  JSON.stringify(
    {
      node: process.version,
      msPerRound: MS,
      microsecondsPerCall: {
        decode: Number(decode.toFixed(2)),
        verify: Number(verifyUs.toFixed(2)),
        principalSystemCached: Number(principalSystem.toFixed(2)),
        principalPersonCached: Number(principalPerson.toFixed(2)),
      },
      ratioToDecode: {
        verify: ratio(verifyUs),
        principalSystemCached: ratio(principalSystem),
        principalPersonCached: ratio(principalPerson),
      },
    },
    null,
    2,
  ),
);
