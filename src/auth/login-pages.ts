/**
 * The login and consent pages of the authorization code flow: server-rendered HTML, no script, no
 * framework. Every value that comes from a client registration or a request is escaped; no page
 * echoes what the user typed except the email address (so a failed login keeps it).
 */

/** Headers every page is sent with: no caching, no framing (clickjacking), no script at all. */
export const PAGE_HEADERS: Readonly<Record<string, string>> = {
  'Content-Type': 'text/html; charset=utf-8',
  'Cache-Control': 'no-store',
  'Content-Security-Policy': "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
  'X-Frame-Options': 'DENY',
  // Not `no-referrer`: with it, browsers send `Origin: null` on the form posts, which the CSRF check
  // must refuse. `same-origin` keeps the Origin for our own forms and gives other sites nothing.
  'Referrer-Policy': 'same-origin',
  'X-Content-Type-Options': 'nosniff',
};

export function escapeHtml(s: string): string {
  return s.replace(
    /[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!,
  );
}

function page(title: string, body: string): string {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(title)} · Custos</title>
<style>
body{font-family:system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b}
label{display:block;margin:.8rem 0 .2rem;font-weight:600}
input,select{width:100%;padding:.45rem;font-size:1rem;box-sizing:border-box}
button{margin-top:1.2rem;padding:.55rem 1.2rem;font-size:1rem}
.error{background:#fde8e8;border:1px solid #c81e1e;padding:.6rem;margin:.8rem 0}
.app{background:#f3f4f6;padding:.6rem;margin:.8rem 0}
ul{padding-left:1.2rem}
</style></head>
<body><h1>${escapeHtml(title)}</h1>
${body}
</body></html>
`;
}

export interface LoginPageModel {
  action: string;
  csrf: string;
  appName: string;
  email?: string;
  error?: string;
}

/** Email, password and (when the account has MFA) the six-digit code, in one form. */
export function loginPage(m: LoginPageModel): string {
  return page(
    'Sign in',
    `<p class="app"><strong>${escapeHtml(m.appName)}</strong> asks you to sign in to Custos.</p>
${m.error ? `<p class="error" role="alert">${escapeHtml(m.error)}</p>` : ''}
<form method="post" action="${escapeHtml(m.action)}" autocomplete="on">
<input type="hidden" name="csrf" value="${escapeHtml(m.csrf)}">
<label for="email">Email</label>
<input id="email" name="email" type="email" required autocomplete="username" value="${escapeHtml(m.email ?? '')}">
<label for="password">Password</label>
<input id="password" name="password" type="password" required autocomplete="current-password">
<label for="totp">Authenticator code (if your account uses one)</label>
<input id="totp" name="totp" inputmode="numeric" pattern="[0-9]{6}" autocomplete="one-time-code">
<button type="submit" name="action" value="login">Sign in</button>
</form>`,
  );
}

export interface ConsentPageModel {
  action: string;
  csrf: string;
  appName: string;
  userLabel: string;
  /** Human descriptions of what the app asks for, one per requested scope. */
  scopes: { scope: string; description: string }[];
  /** Purposes of use to choose from; one fixed purpose is shown, not asked. */
  purposes: { code: string; display: string }[];
  fixedPurpose?: { code: string; display: string };
  /** Ask for a patient (standalone `launch/patient` by someone who is not that patient). */
  askPatient: boolean;
  /** Patients to pick from (id and a label), when the caller listed some. */
  patientChoices?: { id: string; label: string }[];
  error?: string;
}

export function consentPage(m: ConsentPageModel): string {
  const purposeField = m.fixedPurpose
    ? `<p>Purpose of use: <strong>${escapeHtml(m.fixedPurpose.display)}</strong> (${escapeHtml(m.fixedPurpose.code)})</p>`
    : `<label for="purpose">Why are you using this app? (purpose of use)</label>
<select id="purpose" name="purpose" required>
<option value="">Choose…</option>
${m.purposes.map((p) => `<option value="${escapeHtml(p.code)}">${escapeHtml(p.display)} (${escapeHtml(p.code)})</option>`).join('\n')}
</select>`;
  const patientField = !m.askPatient
    ? ''
    : m.patientChoices && m.patientChoices.length > 0
      ? `<label for="patient">Patient</label>
<select id="patient" name="patient" required>
${m.patientChoices.map((p) => `<option value="${escapeHtml(p.id)}">${escapeHtml(p.label)}</option>`).join('\n')}
</select>`
      : `<label for="patient">Patient id</label>
<input id="patient" name="patient" required pattern="[A-Za-z0-9\\-.]{1,64}">`;
  return page(
    'Allow access?',
    `<p class="app"><strong>${escapeHtml(m.appName)}</strong> asks to act for <strong>${escapeHtml(m.userLabel)}</strong>:</p>
${m.error ? `<p class="error" role="alert">${escapeHtml(m.error)}</p>` : ''}
<ul>
${m.scopes.map((s) => `<li>${escapeHtml(s.description)} <code>${escapeHtml(s.scope)}</code></li>`).join('\n')}
</ul>
<form method="post" action="${escapeHtml(m.action)}">
<input type="hidden" name="csrf" value="${escapeHtml(m.csrf)}">
${purposeField}
${patientField}
<button type="submit" name="action" value="allow">Allow</button>
<button type="submit" name="action" value="deny" formnovalidate>Deny</button>
</form>`,
  );
}

/** A page with a message only (rate limited, expired interaction). */
export function messagePage(title: string, message: string): string {
  return page(title, `<p class="error" role="alert">${escapeHtml(message)}</p>`);
}

const ACTIONS: Record<string, string> = {
  c: 'create',
  r: 'read',
  u: 'update',
  d: 'delete',
  s: 'search',
};

/** A reader's description of one requested scope. */
export function describeScope(scope: string): string {
  switch (scope) {
    case 'openid':
    case 'fhirUser':
    case 'profile':
      return 'Know who you are (your user id and FHIR identity)';
    case 'offline_access':
      return 'Keep access after you close the app (until you sign out or it is revoked)';
    case 'online_access':
      return 'Keep access while you are signed in';
    case 'launch/patient':
      return 'Work on one patient, chosen now';
    case 'launch/encounter':
      return 'Work on one encounter, chosen now';
    case 'launch':
      return 'Receive the context the EHR launched it with';
  }
  const m = /^(patient|user|system)\/([^.]+)\.([a-z*]+)(\?.*)?$/.exec(scope);
  if (!m) return 'Unrecognised permission (not granted)';
  const [, context, type, perm, query] = m;
  const verbs =
    perm === '*'
      ? 'create, read, update, delete and search'
      : perm === 'read'
        ? 'read and search'
        : perm === 'write'
          ? 'create, update and delete'
          : [...perm!].map((l) => ACTIONS[l] ?? l).join(', ');
  const what = type === '*' ? 'all record types' : `${type} records`;
  const whose = context === 'patient' ? "of the selected patient's record" : 'that you are allowed to see';
  return `${verbs[0]!.toUpperCase()}${verbs.slice(1)} ${what} ${whose}${query ? ` (only ${query.slice(1)})` : ''}`;
}
