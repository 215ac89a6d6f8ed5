import fs from 'node:fs';
import { required } from './storage.ts';

/**
 * A real headless Chromium (Debian package chromium) for the browser login test, driven by
 * playwright-core with `executablePath` (no browser download). Without it the test skips, saying
 * so; CUSTOS_TEST_REQUIRE=chromium (as .ci/run sets) makes that a failure.
 */
const CANDIDATES = ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/lib/chromium/chromium'];

export function chromiumPath(): string | undefined {
  return CANDIDATES.find((p) => fs.existsSync(p));
}

/** For node:test's `skip`: false when Chromium is installed, else why not. */
export function needsChromium(): false | string {
  if (chromiumPath()) return false;
  if (required.has('chromium'))
    throw new Error(
      'CUSTOS_TEST_REQUIRE includes chromium, but no chromium binary (apt-get install chromium)',
    );
  return 'chromium not installed: apt-get install chromium to run this test';
}
