import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createAuthenticator, CLIENT_CACHE_MS } from '../src/auth/authenticate.ts';
import type { ClientRegistry, ClientRegistration } from '../src/auth/client-registry.ts';
import type { AccessTokenClaims } from '../src/auth/access-token.ts';

// The request-path caches must not outlive what they cache: a token past its exp, a client
// deactivated more than CLIENT_CACHE_MS ago.
function setup() {
  let clock = 1_000_000;
  let verifications = 0;
  const registration: { current: ClientRegistration } = {
    current: {
      id: 'c1',
      projectId: 'p1',
      name: 'test',
      authMethod: 'client_secret',
      secretVersion: 0,
      jwks: undefined,
      scopes: ['system/Patient.rs'],
      redirectUris: [],
      purposes: ['TREAT'],
      mayBreakGlass: false,
      active: true,
    },
  };
  const clients = { find: async () => registration.current } as unknown as ClientRegistry;
  const verify = async (token: string): Promise<AccessTokenClaims> => {
    verifications++;
    if (token !== 'good') throw new Error('bad token');
    return {
      clientId: 'c1',
      scopes: ['system/Patient.rs', 'system/Observation.rs'],
      expiresAt: (clock + 60_000) / 1000,
    };
  };
  const authenticate = createAuthenticator({ verify, clients, now: () => clock });
  return {
    authenticate,
    registration,
    advance: (ms: number) => (clock += ms),
    verifications: () => verifications,
  };
}

test('a verified token is reused until its exp, then verified again', async () => {
  const s = setup();
  await s.authenticate('good');
  await s.authenticate('good');
  assert.equal(s.verifications(), 1);
  s.advance(61_000);
  await s.authenticate('good');
  assert.equal(s.verifications(), 2, 'past exp the token is verified again (and refused if it is expired)');
  await assert.rejects(s.authenticate('forged'));
  assert.equal(s.verifications(), 3, 'an unknown token is never served from the cache');
});

test('the effective permission is the token scopes within the registration', async () => {
  const s = setup();
  const p = await s.authenticate('good');
  assert.equal(p.can('Patient', 'r'), true);
  assert.equal(p.can('Observation', 'r'), false, 'not registered');
  assert.equal(p.can('Patient', 'c'), false);
});

test('a deactivated client is refused within CLIENT_CACHE_MS', async () => {
  const s = setup();
  await s.authenticate('good');
  s.registration.current = { ...s.registration.current, active: false };
  s.advance(CLIENT_CACHE_MS + 1);
  await assert.rejects(s.authenticate('good'), (e: { code?: string }) => e.code === 'UNAUTHENTICATED');
});
