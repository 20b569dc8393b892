-- The seed's auth rule (auth.lua) for examples/llmproxy.yaml, made safe to
-- run on every request:
--   * key_info is nil when the request has no key or an unknown one, and a
--     failing standard check (disabled, expired, IP not allowed, quota used
--     up) must not be turned into an allow: both get the standard verdict
--     (401/403/429) by returning nil;
--   * then the seed's rule: keys with a quota of 1M tokens or more may use
--     every model, the others not gpt-4.
if key_info == nil or key_info == json.null then
  return nil
end
for _, ok in pairs(standard_checks) do
  if ok == false then
    return nil
  end
end

-- 检查用户是否有权限使用特定模型
local model = request.body.model or ""

-- VIP 用户可以使用所有模型
if key_info.total_quota >= 1000000 then
  return {allow = true}
end

-- 普通用户只能使用 gpt-3.5
if model == "gpt-4" then
  return {
    allow = false,
    reason = "您的账户等级不支持 GPT-4 模型"
  }
end

return {allow = true}
