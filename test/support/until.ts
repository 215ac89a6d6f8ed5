/**
 * Polls `f` every 25 ms until it returns something other than undefined or false, and returns that;
 * throws naming `what` after `ms`. The limit only matters when the awaited thing never happens, so
 * it is generous: a loaded CI machine can be many times slower than a laptop.
 */
export async function until<T>(
  what: string,
  f: () => Promise<T | undefined | false> | T | undefined | false,
  ms = 60_000,
): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
