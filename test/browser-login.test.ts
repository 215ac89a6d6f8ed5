import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { chromium, type Browser } from 'playwright-core';
import { freePort, startHarness, testPatient, type Harness } from './support/harness.ts';
import { chromiumPath, needsChromium } from './support/chromium.ts';
import { totpCode } from '../src/auth/totp.ts';

// The login and consent pages in a real browser (headless Chromium): a practitioner with MFA signs
// in with password and TOTP, picks the purpose of use and the patient, allows; the app gets a code,
// exchanges it (PKCE) and reads the patient. The pages use no script at all (their CSP forbids it).

const PASSWORD = 'Zz-synthetic-passphrase-0142';
const skip = needsChromium();

describe('browser login with password and TOTP, consent with purpose and patient', { skip }, () => {
  let h: Harness;
  let browser: Browser;
  let app: http.Server;
  let redirect: string;
  let appId: string;
  let patientId: string;
  let totpSecret: string;
  const email = 'dr.zzbrowser@example.org';

  before(async () => {
    h = await startHarness();
    const core = h.server.core;
    const projectId = h.init.projectId;
    const post = async (body: Record<string, unknown>) => {
      const r = await h.fhir(`/${String(body.resourceType)}`, { method: 'POST', body: JSON.stringify(body) });
      assert.equal(r.status, 201);
      return ((await r.json()) as { id: string }).id;
    };
    const practitionerId = await post(
      testPatient({ resourceType: 'Practitioner', name: [{ family: 'Zzbrowserdoc' }] }),
    );
    // In the practitioner's care team (generalPractitioner), as the default practitioner policy asks.
    patientId = await post(
      testPatient({
        name: [{ family: 'Zzbrowserpatient' }],
        generalPractitioner: [{ reference: `Practitioner/${practitionerId}` }],
      }),
    );
    const created = await core.users.create({
      projectId,
      role: 'practitioner',
      email,
      fhirUser: `Practitioner/${practitionerId}`,
      password: PASSWORD,
      mfa: true,
    });
    totpSecret = created.totpSecret!;
    // The app: a page at its redirect URI that just shows what it received.
    const port = await freePort();
    redirect = `http://127.0.0.1:${port}/callback`;
    app = http.createServer((req, res) => {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(`<p id="got">${new URL(req.url!, redirect).search.replace(/[<>&"]/g, '')}</p>`);
    });
    await new Promise<void>((r) => app.listen(port, '127.0.0.1', r));
    appId = (
      await core.admin.createClient({
        projectId,
        name: 'Zz Browser App',
        scopes: ['openid', 'fhirUser', 'launch/patient', 'patient/*.rs'],
        purposes: ['TREAT', 'CAREMGT'],
        redirectUris: [redirect],
        public: true,
      })
    ).clientId;
    browser = await chromium.launch({ executablePath: chromiumPath(), args: ['--no-sandbox'] });
  });
  after(async () => {
    await browser?.close();
    app?.close();
    await h?.close();
  });

  test('sign in, consent, get a code, read the chosen patient with the purpose chosen', async () => {
    const verifier = randomBytes(32).toString('base64url');
    const challenge = createHash('sha256').update(verifier).digest('base64url');
    const page = await browser.newPage();
    const blocked: string[] = [];
    page.on('console', (m) => {
      if (m.type() === 'error') blocked.push(m.text());
    });
    await page.goto(
      `${h.server.url}/oauth/authorize?${new URLSearchParams({
        response_type: 'code',
        client_id: appId,
        redirect_uri: redirect,
        scope: 'openid fhirUser launch/patient patient/*.rs',
        state: 'zzbrowserstate',
        aud: h.base,
        code_challenge: challenge,
        code_challenge_method: 'S256',
      })}`,
    );
    assert.match((await page.textContent('body')) ?? '', /Zz Browser App/, 'the login page names the app');

    // Without the code first: the page asks for it (MFA is required for this user).
    await page.fill('#email', email);
    await page.fill('#password', PASSWORD);
    await page.click('button[value=login]');
    assert.match((await page.textContent('body')) ?? '', /code from your authenticator/);
    await page.fill('#password', PASSWORD);
    await page.fill('#totp', totpCode(totpSecret, Date.now()));
    await page.click('button[value=login]');

    // Consent: what the app asks for, in words; purpose and patient chosen here.
    const consent = (await page.textContent('body')) ?? '';
    assert.match(consent, /Zz Browser App/);
    assert.match(consent, /dr\.zzbrowser@example\.org/);
    await page.selectOption('#purpose', 'CAREMGT');
    await page.fill('#patient', patientId);
    await page.click('button[value=allow]');
    await page.waitForURL(/\/callback\?/);
    const back = new URL(page.url());
    assert.equal(back.searchParams.get('state'), 'zzbrowserstate');
    const code = back.searchParams.get('code')!;
    assert.ok(code);
    // (The 401 of the sign-in without a code shows as a console error; a CSP violation would too.)
    assert.deepEqual(
      blocked.filter((t) => /Content Security Policy|Refused to/.test(t)),
      [],
      'nothing on the pages was blocked by their CSP',
    );

    const tokenRes = await fetch(`${h.server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'authorization_code',
        code,
        redirect_uri: redirect,
        client_id: appId,
        code_verifier: verifier,
      }),
    });
    assert.equal(tokenRes.status, 200);
    assert.match(tokenRes.headers.get('cache-control') ?? '', /no-store/);
    const tokens = (await tokenRes.json()) as Record<string, string>;
    assert.equal(tokens.patient, patientId);
    const claims = JSON.parse(
      Buffer.from(tokens.access_token!.split('.')[1]!, 'base64url').toString(),
    ) as Record<string, unknown>;
    assert.equal(claims.purpose_of_use, 'CAREMGT', 'the purpose chosen on the consent page');
    assert.equal(claims.user_role, 'practitioner');
    const read = await h.fhir(`/Patient/${patientId}`, { token: tokens.access_token!, purpose: null });
    assert.equal(read.status, 200);
    // The same code twice: refused (codes are single use).
    const again = await fetch(`${h.server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'authorization_code',
        code,
        redirect_uri: redirect,
        client_id: appId,
        code_verifier: verifier,
      }),
    });
    assert.equal(again.status, 400);
    await page.close();
  });
});
