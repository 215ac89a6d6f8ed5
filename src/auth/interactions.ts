import { createHmac, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Interaction, Provider } from 'oidc-provider';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { Logger } from '../log/logger.ts';
import { errorFields } from '../log/logger.ts';
import { isFhirId, newId } from '../kernel/ids.ts';
import type { RateLimiter } from '../kernel/rate-limit.ts';
import { BREAK_GLASS_PURPOSES } from '../phi/purpose-of-use.ts';
import type { ClientRegistration, ClientRegistry } from './client-registry.ts';
import type { UserService } from './users.ts';
import type { SessionStore } from './sessions.ts';
import { consentPage, describeScope, loginPage, messagePage, PAGE_HEADERS } from './login-pages.ts';
import { isLaunchScope, loadEhrLaunch, saveLaunchContext } from './smart-launch.ts';
import { parseSmartScope } from './smart-scopes.ts';

/** The cookie holding a person's login session id (sessions.ts); scoped to the OAuth pages. */
export const SESSION_COOKIE = 'custos_sid';
const FORM_LIMIT = 8 * 1024;

export interface InteractionDeps {
  provider: Provider;
  db: SqlDriver;
  clients: ClientRegistry;
  users: UserService;
  sessions: SessionStore;
  /** Keys the CSRF tokens of the forms (HMAC of the interaction id). */
  csrfKey: Buffer;
  /** `Secure` on our cookie (an https issuer). */
  secureCookies: boolean;
  /** The public origin: a form POST from any other `Origin` is refused. */
  origin: string;
  loginLimiter: RateLimiter;
  log: Logger;
  /** Whether a live Patient with this id exists in the project (existence only, no content). */
  patientExists(projectId: string, id: string): Promise<boolean>;
}

/**
 * The login and consent steps of the authorization code flow, at `/oauth/interaction/:uid`
 * (oidc-provider sends the browser here: https://github.com/panva/node-oidc-provider/blob/main/docs/README.md#interactions).
 *
 * - Login: email, password and TOTP checked by UserService.verifyLogin within the client's project
 *   (lockout, audit); a login session (SessionStore, idle timeout) is started and its id set in an
 *   HttpOnly, SameSite=Lax cookie. Rate limited per client address.
 * - Consent: shows the app and what it asks for in words, asks the purpose of use when the app does
 *   not carry exactly one, and for `launch/patient` the patient (a patient user is their own patient).
 *   The choice is stored as the grant's launch context (smart-launch.ts).
 * - CSRF: every form carries an HMAC of the interaction id, and a POST whose `Origin` is not ours is
 *   refused; oidc-provider's own interaction cookie (SameSite=Lax) must also match.
 */
export function createInteractionHandler(
  deps: InteractionDeps,
): (req: IncomingMessage, res: ServerResponse) => Promise<void> {
  const csrfOf = (uid: string) =>
    createHmac('sha256', deps.csrfKey).update(`csrf:${uid}`).digest('base64url');
  const csrfOk = (uid: string, token: unknown) => {
    if (typeof token !== 'string') return false;
    const a = Buffer.from(token);
    const b = Buffer.from(csrfOf(uid));
    return a.length === b.length && timingSafeEqual(a, b);
  };

  return async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const m = /^\/oauth\/interaction\/([A-Za-z0-9_-]{1,64})(?:\/(login|consent))?$/.exec(url.pathname);
    if (!m) return send(res, 404, messagePage('Not found', 'There is no such page.'));
    const [, uid, step] = m;
    let details: Interaction;
    try {
      details = await deps.provider.interactionDetails(req, res);
    } catch {
      return send(
        res,
        400,
        messagePage(
          'Sign-in expired',
          'This sign-in has expired or was opened elsewhere. Start again from the app.',
        ),
      );
    }
    if (details.uid !== uid)
      return send(res, 400, messagePage('Sign-in expired', 'Start again from the app.'));
    const client = await deps.clients.find(String(details.params.client_id));
    if (!client || !client.active)
      return send(res, 400, messagePage('Unknown app', 'This app is not registered.'));
    const base = `/oauth/interaction/${uid}`;
    // Set by the authorization server's handler from the socket (or a trusted proxy), never the client's.
    const ip = String(req.headers['x-forwarded-for'] ?? req.socket.remoteAddress ?? 'unknown');
    const userAgent = req.headers['user-agent'];

    try {
      if (req.method === 'GET' && !step) {
        if (details.prompt.name === 'login') {
          return send(
            res,
            200,
            loginPage({ action: `${base}/login`, csrf: csrfOf(uid!), appName: client.name }),
          );
        }
        return send(res, 200, await consentView(details, client, base, csrfOf(uid!)));
      }
      if (req.method !== 'POST' || !step) return send(res, 405, messagePage('Not allowed', 'Use the form.'));
      const origin = req.headers.origin;
      if (origin !== undefined && origin !== deps.origin) {
        return send(res, 403, messagePage('Refused', 'This form was sent from another site.'));
      }
      const form = await readForm(req);
      if (!form || !csrfOk(uid!, form.get('csrf'))) {
        return send(res, 403, messagePage('Refused', 'This form has expired. Start again from the app.'));
      }

      if (step === 'login') {
        if (details.prompt.name !== 'login')
          return send(res, 400, messagePage('Refused', 'Already signed in.'));
        const wait = deps.loginLimiter.take(ip ?? 'unknown');
        if (wait > 0) {
          await deps.users.auditRefusedLogin('login.rate_limited', { ip, userAgent }, client.projectId);
          res.setHeader('Retry-After', String(wait));
          return send(
            res,
            429,
            messagePage('Too many attempts', `Too many sign-in attempts. Wait ${wait} s.`),
          );
        }
        const email = form.get('email') ?? '';
        const result = await deps.users.verifyLogin(
          {
            projectId: client.projectId,
            email,
            password: form.get('password') ?? '',
            totp: form.get('totp') || undefined,
          },
          { requestId: newId(), ip, userAgent },
        );
        if (!result.ok) {
          const message =
            result.code === 'ACCOUNT_LOCKED'
              ? `Too many failed attempts: this account is locked for ${result.retryAfterSeconds ?? 60} s.`
              : result.code === 'MFA_REQUIRED'
                ? 'Enter the code from your authenticator app.'
                : result.code === 'MFA_ENROLLMENT_REQUIRED'
                  ? 'This account needs an authenticator; ask an administrator to set it up.'
                  : 'The email, password or code is not right.';
          return send(
            res,
            result.code === 'ACCOUNT_LOCKED' ? 429 : 401,
            loginPage({
              action: `${base}/login`,
              csrf: csrfOf(uid!),
              appName: client.name,
              email,
              error: message,
            }),
          );
        }
        const session = await deps.sessions.create(result.user, result.amr);
        res.setHeader('Set-Cookie', sessionCookie(session.sessionId, deps.secureCookies));
        return await deps.provider.interactionFinished(
          req,
          res,
          { login: { accountId: result.user.id, amr: result.amr, remember: false } },
          { mergeWithLastSubmission: false },
        );
      }

      // Consent.
      if (details.prompt.name !== 'consent') return send(res, 400, messagePage('Refused', 'Sign in first.'));
      if (form.get('action') === 'deny') {
        return await deps.provider.interactionFinished(
          req,
          res,
          { error: 'access_denied', error_description: 'the user denied the request' },
          { mergeWithLastSubmission: false },
        );
      }
      const view = await consentFacts(details, client);
      if (!view) return send(res, 400, messagePage('Refused', 'Sign in again.'));
      if (view.launchInvalid)
        return send(
          res,
          400,
          messagePage('Launch expired', 'This launch has expired or is not for this app.'),
        );
      const purpose = view.fixedPurpose?.code ?? form.get('purpose') ?? '';
      const again = (error: string) =>
        consentView(details, client, base, csrfOf(uid!), error).then((html) => send(res, 400, html));
      if (!view.purposes.some((p) => p.code === purpose) && view.fixedPurpose?.code !== purpose) {
        return again('Choose a purpose of use.');
      }
      let patient: string | undefined = view.ehr?.patient;
      const encounter = view.ehr?.encounter;
      if (view.wantsPatient) {
        patient = view.ownPatient ?? form.get('patient') ?? '';
        if (!isFhirId(patient) || !(await deps.patientExists(client.projectId, patient))) {
          return again('There is no such patient.');
        }
      }
      const { provider } = deps;
      const accountId = view.user.id;
      const grant =
        (details.grantId ? await provider.Grant.find(details.grantId) : undefined) ??
        new provider.Grant({ accountId, clientId: client.id });
      const registered = new Set(client.scopes);
      const d = details.prompt.details as {
        missingOIDCScope?: string[];
        missingOIDCClaims?: string[];
        missingResourceScopes?: Record<string, string[]>;
      };
      // OIDC and launch scopes only as registered; the others are refused (recorded as such, so that
      // the consent prompt does not come back for them).
      const missingOidc = d.missingOIDCScope ?? [];
      const oidcScopes = missingOidc.filter((s) => s === 'openid' || registered.has(s));
      const refused = missingOidc.filter((s) => !oidcScopes.includes(s));
      if (oidcScopes.length) grant.addOIDCScope(oidcScopes.join(' '));
      if (refused.length) grant.rejectOIDCScope(refused.join(' '));
      if (d.missingOIDCClaims?.length) grant.addOIDCClaims(d.missingOIDCClaims);
      for (const [resource, scopes] of Object.entries(d.missingResourceScopes ?? {})) {
        grant.addResourceScope(resource, scopes.join(' '));
      }
      const grantId = await grant.save();
      await saveLaunchContext(deps.db, grantId, {
        role: view.user.role,
        purpose,
        ...(view.user.fhirUser ? { fhirUser: view.user.fhirUser } : {}),
        ...(patient ? { patient } : {}),
        ...(encounter ? { encounter } : {}),
      });
      return await provider.interactionFinished(
        req,
        res,
        { consent: { grantId } },
        { mergeWithLastSubmission: true },
      );
    } catch (e) {
      deps.log.error('oauth.interaction_failed', errorFields(e));
      if (!res.headersSent) send(res, 500, messagePage('Something went wrong', 'Try again from the app.'));
    }
  };

  /** What the consent step needs to know, or undefined when the interaction has no live user. */
  async function consentFacts(details: Interaction, client: ClientRegistration) {
    const accountId = details.session?.accountId;
    const user = accountId ? await deps.users.find({ userId: accountId }) : undefined;
    if (!user || !user.active || user.projectId !== client.projectId) return undefined;
    const requested = String(details.params.scope ?? '')
      .split(' ')
      .filter(Boolean);
    const registered = new Set(client.scopes);
    // Break-glass is not a consent choice: it is claimed per request, with a reason (INTERFACE.md).
    const choosable = client.purposes.filter((p) => !BREAK_GLASS_PURPOSES.has(p));
    const display = (code: string) => ({ code, display: code });
    const ownPatient = user.role === 'patient' ? /^Patient\/(.+)$/.exec(user.fhirUser ?? '')?.[1] : undefined;
    // EHR launch: the context comes from the launch the EHR created for this app (smart-launch.ts).
    const launchId = typeof details.params.launch === 'string' ? details.params.launch : undefined;
    const ehr =
      launchId !== undefined && requested.includes('launch') && registered.has('launch')
        ? await loadEhrLaunch(deps.db, launchId)
        : undefined;
    const launchInvalid =
      launchId !== undefined && (!ehr || ehr.clientId !== client.id || ehr.projectId !== client.projectId);
    return {
      ehr: launchInvalid ? undefined : ehr,
      launchInvalid,
      user,
      requested: requested.filter(
        (s) => (isLaunchScope(s) && (s === 'openid' || registered.has(s))) || parseSmartScope(s) !== null,
      ),
      purposes: choosable.length === 1 ? [] : choosable.map(display),
      fixedPurpose: choosable.length === 1 ? display(choosable[0]!) : undefined,
      wantsPatient: !ehr && requested.includes('launch/patient') && registered.has('launch/patient'),
      ownPatient,
    };
  }

  async function consentView(
    details: Interaction,
    client: ClientRegistration,
    base: string,
    csrf: string,
    error?: string,
  ): Promise<string> {
    const view = await consentFacts(details, client);
    if (!view) return messagePage('Sign in again', 'Your session has ended. Start again from the app.');
    if (view.launchInvalid)
      return messagePage(
        'Launch expired',
        'This launch has expired or is not for this app. Start again from the EHR.',
      );
    return consentPage({
      action: `${base}/consent`,
      csrf,
      appName: client.name,
      userLabel: view.user.email,
      scopes: view.requested.map((scope) => ({ scope, description: describeScope(scope) })),
      purposes: view.purposes,
      ...(view.fixedPurpose ? { fixedPurpose: view.fixedPurpose } : {}),
      askPatient: view.wantsPatient && view.ownPatient === undefined,
      ...(error ? { error } : {}),
    });
  }
}

function sessionCookie(sessionId: string, secure: boolean): string {
  return `${SESSION_COOKIE}=${sessionId}; Path=/oauth; HttpOnly; SameSite=Lax${secure ? '; Secure' : ''}`;
}

function send(res: ServerResponse, status: number, html: string): void {
  res.writeHead(status, PAGE_HEADERS);
  res.end(html);
}

/** An `application/x-www-form-urlencoded` body of at most FORM_LIMIT bytes; undefined otherwise. */
async function readForm(req: IncomingMessage): Promise<URLSearchParams | undefined> {
  if (!String(req.headers['content-type'] ?? '').startsWith('application/x-www-form-urlencoded'))
    return undefined;
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > FORM_LIMIT) return undefined;
    chunks.push(chunk as Buffer);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}
