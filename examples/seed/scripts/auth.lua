-- 检查用户是否有权限使用特定模型
local model = request.body.model or ""
local user_id = request.user_id

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
